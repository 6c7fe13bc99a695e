// node-postgres listeners (client.on('notification')) through transaction
// pooling (odissey's port in argv[2], listeners in argv[3]). Prints
// "listening" once all are set and waits for a line on stdin, then a
// notifier sends 20 notifications: every listener gets each once, in
// order; the first ten UNLISTEN and get no more, the others get the rest.
const { Client } = require('pg');
const readline = require('readline');

const port = Number(process.argv[2]);
const count = Number(process.argv[3]);
const CH = 'node_jobs';
const opts = { host: '127.0.0.1', port, database: 'test', user: 'trust_user' };

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function main() {
  let failures = 0;
  const got = [];
  const clients = [];
  for (let k = 0; k < count; k++) {
    const c = new Client(opts);
    await c.connect();
    got.push([]);
    c.on('notification', (m) => got[k].push([m.channel, m.payload]));
    await c.query(`LISTEN ${CH}`);
    clients.push(c);
  }
  console.log('listening');
  const rl = readline.createInterface({ input: process.stdin });
  await new Promise((r) => rl.once('line', r));
  rl.close();

  const notifier = new Client(opts);
  await notifier.connect();
  for (let i = 0; i < 20; i++) {
    if (i % 2) await notifier.query('SELECT pg_notify($1, $2)', [CH, `n${i}`]);
    else await notifier.query(`NOTIFY ${CH}, 'n${i}'`);
  }
  const want = JSON.stringify(Array.from({ length: 20 }, (_, i) => [CH, `n${i}`]));
  const settle = async (k, n) => {
    for (let t = 0; t < 100 && got[k].length < n; t++) await sleep(50);
  };
  for (let k = 0; k < count; k++) {
    await settle(k, 20);
    if (JSON.stringify(got[k]) !== want) {
      console.log(`listener ${k}: got ${JSON.stringify(got[k])}`);
      failures++;
    }
    got[k].length = 0;
  }
  for (let k = 0; k < 10; k++) await clients[k].query(`UNLISTEN ${CH}`);
  for (let i = 0; i < 3; i++) await notifier.query(`NOTIFY ${CH}, 'late${i}'`);
  const late = JSON.stringify([0, 1, 2].map((i) => [CH, `late${i}`]));
  for (let k = 10; k < count; k++) await settle(k, 3);
  await sleep(300);
  for (let k = 0; k < count; k++) {
    const have = JSON.stringify(got[k]);
    if (have !== (k < 10 ? '[]' : late)) {
      console.log(`listener ${k} after UNLISTEN: got ${have}`);
      failures++;
    }
  }
  for (const c of clients) await c.end();
  await notifier.end();
  console.log(`node-postgres listeners: ${failures} failure(s)`);
  process.exit(failures ? 1 : 0);
}

main().catch((e) => {
  console.log(`node-postgres: ${e.stack || e}`);
  process.exit(1);
});
