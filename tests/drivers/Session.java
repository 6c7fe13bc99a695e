// Session fidelity through odissey with pgjdbc (tests/session.rs), default
// driver settings: extended protocol, prepareThreshold 5 (the read below
// becomes a named server-side statement from its fifth use).
//
// Usage: java -cp DIR:postgresql.jar Session PORT MODE AUTOCOMMIT
//   MODE set        Statement.execute("SET search_path TO s_k")
//        setSchema  Connection.setSchema("s_k")
//        isolation  setTransactionIsolation(TRANSACTION_SERIALIZABLE) on
//                   even clients; odd clients keep read committed
//   AUTOCOMMIT true | false
//
// 8 threads, one connection each, set their session, wait for each other,
// then read it back 40 times in new transactions. Exits 1 with every wrong
// read (how many, what was read, what was expected) on stderr.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import java.util.TreeSet;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;

public class Session {
    static final int CLIENTS = 8;
    static final int ROUNDS = 40;

    static final Object lock = new Object();
    static int reads = 0;
    static int wrong = 0;
    static final Map<Integer, Integer> wrongBy = new TreeMap<>();
    static final Map<Integer, List<String>> samples = new TreeMap<>();
    static final Map<Integer, TreeSet<Integer>> pidClients = new TreeMap<>();
    static final List<String> errors = new ArrayList<>();

    static void read(int k, int round, String got, String expected, int pid) {
        synchronized (lock) {
            reads++;
            pidClients.computeIfAbsent(pid, p -> new TreeSet<>()).add(k);
            if (!got.equals(expected)) {
                wrong++;
                wrongBy.merge(k, 1, Integer::sum);
                List<String> s = samples.computeIfAbsent(k, c -> new ArrayList<>());
                if (s.size() < 3) {
                    s.add("round " + round + ": read '" + got + "', expected '" + expected + "' (backend pid " + pid + ")");
                }
            }
        }
    }

    /** The exception and its causes, with where the innermost was thrown. */
    static String describe(Throwable e) {
        StringBuilder out = new StringBuilder(e.toString());
        Throwable root = e;
        while (root.getCause() != null && root.getCause() != root) {
            root = root.getCause();
            out.append(" caused by ").append(root);
        }
        StackTraceElement[] at = root.getStackTrace();
        for (int i = 0; i < Math.min(3, at.length); i++) {
            out.append(i == 0 ? " at " : " < ").append(at[i]);
        }
        return out.toString();
    }

    public static void main(String[] args) throws Exception {
        int port = Integer.parseInt(args[0]);
        String mode = args[1];
        boolean autoCommit = Boolean.parseBoolean(args[2]);
        String url = "jdbc:postgresql://127.0.0.1:" + port + "/test?user=trust_user&sslmode=disable&connectTimeout=10&socketTimeout=60";
        String what = "JDBC " + mode + " (autoCommit " + autoCommit + ")";
        // Every client sets its session before any reads (a client that
        // fails counts down too, so that the others never wait for it).
        CountDownLatch ready = new CountDownLatch(CLIENTS);
        List<Thread> threads = new ArrayList<>();
        for (int i = 0; i < CLIENTS; i++) {
            final int k = i;
            Thread t = new Thread(() -> {
                boolean counted = false;
                try (Connection conn = DriverManager.getConnection(url)) {
                    conn.setAutoCommit(autoCommit);
                    String schema = "s_" + k;
                    String expected;
                    String sql;
                    switch (mode) {
                        case "set":
                            try (Statement st = conn.createStatement()) {
                                st.execute("SET search_path TO " + schema);
                            }
                            expected = schema + " {" + schema + "}";
                            sql = "SELECT current_setting('search_path') || ' ' || current_schemas(false)::text, pg_backend_pid()";
                            break;
                        case "setSchema":
                            conn.setSchema(schema);
                            expected = schema + " {" + schema + "}";
                            sql = "SELECT current_setting('search_path') || ' ' || current_schemas(false)::text, pg_backend_pid()";
                            break;
                        case "isolation":
                            if (k % 2 == 0) {
                                conn.setTransactionIsolation(Connection.TRANSACTION_SERIALIZABLE);
                                expected = "serializable";
                            } else {
                                expected = "read committed";
                            }
                            sql = "SELECT current_setting('transaction_isolation'), pg_backend_pid()";
                            break;
                        default:
                            throw new IllegalArgumentException("unknown mode " + mode);
                    }
                    if (!autoCommit) {
                        conn.commit();
                    }
                    ready.countDown();
                    counted = true;
                    if (!ready.await(60, TimeUnit.SECONDS)) {
                        throw new IllegalStateException("the other clients were not ready within 60 s");
                    }
                    try (PreparedStatement ps = conn.prepareStatement(sql)) {
                        for (int r = 0; r < ROUNDS; r++) {
                            try (ResultSet rs = ps.executeQuery()) {
                                rs.next();
                                read(k, r, rs.getString(1), expected, rs.getInt(2));
                            }
                            if (!autoCommit) {
                                conn.commit();
                            }
                        }
                    }
                } catch (Exception e) {
                    if (!counted) {
                        ready.countDown();
                    }
                    synchronized (lock) {
                        errors.add("client " + k + ": " + describe(e));
                    }
                }
            });
            threads.add(t);
            t.start();
        }
        for (Thread t : threads) {
            t.join();
        }
        List<String> failures = new ArrayList<>();
        System.out.println(what + ": " + reads + " reads, " + wrong + " wrong, server pids -> clients: " + pidClients);
        if (wrong > 0) {
            failures.add(what + ": " + wrong + " of " + reads + " reads were wrong (clients with wrong reads: " + wrongBy.size() + ")");
            for (Map.Entry<Integer, Integer> e : wrongBy.entrySet()) {
                failures.add("  client " + e.getKey() + ": " + e.getValue() + " wrong; first: " + String.join("; ", samples.get(e.getKey())));
            }
        }
        for (String e : errors) {
            failures.add(what + ": " + e);
        }
        boolean shared = pidClients.values().stream().anyMatch(c -> c.size() > 1);
        TreeSet<Integer> readers = new TreeSet<>();
        pidClients.values().forEach(readers::addAll);
        // With fewer than two clients reading, sharing is impossible; the
        // errors above say why the others did not read.
        if (readers.size() >= 2 && !shared) {
            failures.add(what + ": no server connection served two clients during the reads (" + pidClients
                    + "): transaction pooling with pool_size 2 must share them, and without sharing this test proves nothing");
        }
        if (!failures.isEmpty()) {
            System.err.println("FAILED");
            System.err.println(String.join("\n", failures));
            System.exit(1);
        }
        System.out.println("ok");
    }
}
