#!/usr/bin/env bash
# usage: run.sh NAME BINARY PORT  -> prints Ir per transaction for each workload
set -u
name=$1; bin=$2; port=$3
dir=/tmp/cg/$name; rm -rf $dir; mkdir -p $dir
cat > $dir/o.toml <<T
workers = 1
[[listen]]
host = "127.0.0.1"
port = $port
[storage.pg]
type = "remote"
host = "127.0.0.1"
port = 5499
[database.postgres.user.postgres]
authentication = "none"
storage = "pg"
pool = "transaction"
pool_size = 8
pool_timeout = 120000
T
valgrind --tool=callgrind --callgrind-out-file=$dir/cg.out $bin $dir/o.toml > $dir/log 2>&1 &
vpid=$!
for i in $(seq 1 120); do pg_isready -q -h 127.0.0.1 -p $port && break; sleep 0.5; done
PGB="pgbench -n -h 127.0.0.1 -p $port -U postgres postgres"
$PGB -S -c 8 -j 2 -t 50 >/dev/null 2>&1
measure() { # label tx pgbench-args...
  label=$1; tx=$2; shift 2
  callgrind_control -z $vpid >/dev/null
  $PGB "$@" > $dir/$label.pgb 2>&1 || echo "pgbench failed $label"
  callgrind_control -d $label $vpid >/dev/null
  sleep 0.5
  f=$(ls -t $dir/cg.out* | head -1)
  ir=$(grep -E '^(summary|totals):' $f | head -1 | awk '{print $2}')
  echo "$name $label $(( ir / tx ))"
}
measure simple 4000 -S -M simple -c 8 -j 2 -t 500
measure extended 4000 -S -M extended -c 8 -j 2 -t 500
measure prepared 4000 -S -M prepared -c 8 -j 2 -t 500
measure tpcb 1600 -M simple -c 8 -j 2 -t 200
measure churn 800 -S -C -c 8 -j 2 -t 100
kill -INT $vpid; sleep 3; kill -9 $vpid 2>/dev/null
wait 2>/dev/null
