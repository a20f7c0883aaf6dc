// pgjdbc (Debian's libpostgresql-jdbc-java) through the pgtwig proxy, with
// prepareThreshold=1: server-prepared statements, batches, COPY via
// CopyManager, LISTEN/NOTIFY pids, cancel, terminate-by-pid, TLS and a
// branch switch. The environment is the one tests/clients/python/harness.py
// describes; the last line printed is one JSON object with the checks
// passed. "Direct" here is a plain byte forwarder from 127.0.0.1 to the
// branch's Unix socket (pgjdbc has no Unix sockets of its own).

import java.io.*;
import java.net.*;
import java.nio.ByteBuffer;
import java.nio.channels.*;
import java.nio.file.Path;
import java.sql.*;
import java.util.*;
import java.util.concurrent.*;
import java.util.concurrent.atomic.AtomicInteger;
import javax.net.ssl.SSLSocket;
import org.postgresql.PGConnection;
import org.postgresql.PGNotification;
import org.postgresql.PGStatement;
import org.postgresql.copy.CopyManager;
import org.postgresql.ssl.NonValidatingFactory;

public class JdbcClient {
    static final String SSLMODE = System.getenv("SSLMODE");
    static final List<String> passed = new ArrayList<>();

    /** Counts TLS sockets, so the test knows TLS was used when asked for. */
    public static class CountingFactory extends NonValidatingFactory {
        static final AtomicInteger made = new AtomicInteger();

        public CountingFactory() throws java.security.GeneralSecurityException {
            super(null);
        }

        @Override
        public Socket createSocket(Socket s, String host, int port, boolean autoClose) throws IOException {
            Socket tls = super.createSocket(s, host, port, autoClose);
            if (tls instanceof SSLSocket) made.incrementAndGet();
            return tls;
        }
    }

    static void check(String name, boolean ok, Object detail) {
        if (!ok) throw new AssertionError(name + ": " + detail);
        passed.add(name);
    }

    static String proxyUrl;

    static Connection proxy() throws SQLException {
        return proxy("");
    }

    static Connection proxy(String extra) throws SQLException {
        URI u = URI.create(System.getenv("PROXY_URL"));
        String url = "jdbc:postgresql://" + u.getHost() + ":" + u.getPort() + "/postgres?user=postgres"
                + "&prepareThreshold=1&connectTimeout=10&sslmode=" + SSLMODE
                + "&sslfactory=JdbcClient$CountingFactory" + extra;
        return DriverManager.getConnection(url);
    }

    static final Map<String, Integer> forwarders = new HashMap<>();

    /** A connection to `branch` through a byte forwarder to its Unix socket. */
    static Connection direct(String branch) throws Exception {
        int port = forwarders.computeIfAbsent(branch, b -> {
            try {
                return forward(socketPath(b));
            } catch (IOException e) {
                throw new UncheckedIOException(e);
            }
        });
        return DriverManager.getConnection("jdbc:postgresql://127.0.0.1:" + port + "/postgres?user=postgres&sslmode=disable&prepareThreshold=1");
    }

    static Path socketPath(String branch) {
        String json = System.getenv("DIRECT_URLS");
        int at = json.indexOf("\"" + branch + "\"");
        String url = json.substring(json.indexOf('"', at + branch.length() + 3) + 1);
        url = url.substring(0, url.indexOf('"'));
        Map<String, String> q = new HashMap<>();
        for (String kv : url.substring(url.indexOf('?') + 1).split("&")) {
            String[] p = kv.split("=", 2);
            q.put(p[0], URLDecoder.decode(p[1], java.nio.charset.StandardCharsets.UTF_8));
        }
        return Path.of(q.get("host"), ".s.PGSQL." + q.getOrDefault("port", "5432"));
    }

    static int forward(Path unix) throws IOException {
        ServerSocket listener = new ServerSocket(0, 50, InetAddress.getLoopbackAddress());
        Thread t = new Thread(() -> {
            while (true) {
                Socket tcp;
                try {
                    tcp = listener.accept();
                } catch (IOException e) {
                    return;
                }
                try {
                    SocketChannel server = SocketChannel.open(UnixDomainSocketAddress.of(unix));
                    // The channel's own read and write, not Channels' streams: those share
                    // one lock on a blocking channel, and a pending read would block writes.
                    InputStream fromServer = new InputStream() {
                        public int read() throws IOException {
                            byte[] one = new byte[1];
                            return read(one, 0, 1) < 0 ? -1 : one[0] & 0xff;
                        }

                        public int read(byte[] b, int off, int len) throws IOException {
                            return server.read(ByteBuffer.wrap(b, off, len));
                        }
                    };
                    OutputStream toServer = new OutputStream() {
                        public void write(int b) throws IOException {
                            write(new byte[] {(byte) b}, 0, 1);
                        }

                        public void write(byte[] b, int off, int len) throws IOException {
                            ByteBuffer buf = ByteBuffer.wrap(b, off, len);
                            while (buf.hasRemaining()) server.write(buf);
                        }
                    };
                    pump(fromServer, tcp.getOutputStream(), tcp, server);
                    pump(tcp.getInputStream(), toServer, tcp, server);
                } catch (IOException e) {
                    System.err.println("forwarding to " + unix + ": " + e);
                    try {
                        tcp.close();
                    } catch (IOException ignored) {
                    }
                }
            }
        });
        t.setDaemon(true);
        t.start();
        return listener.getLocalPort();
    }

    static void pump(InputStream in, OutputStream out, Socket tcp, SocketChannel server) {
        Thread t = new Thread(() -> {
            try {
                in.transferTo(out);
            } catch (IOException ignored) {
            }
            try {
                tcp.close();
                server.close();
            } catch (IOException ignored) {
            }
        });
        t.setDaemon(true);
        t.start();
    }

    static Object one(Connection c, String sql, Object... params) throws SQLException {
        try (PreparedStatement ps = c.prepareStatement(sql)) {
            for (int i = 0; i < params.length; i++) ps.setObject(i + 1, params[i]);
            try (ResultSet rs = ps.executeQuery()) {
                rs.next();
                return rs.getObject(1);
            }
        }
    }

    static int pid(Connection c) throws SQLException {
        return c.unwrap(PGConnection.class).getBackendPID();
    }

    static String state(Connection d, int pid) throws SQLException {
        return (String) one(d, "select coalesce((select state from pg_stat_activity where pid = ?), 'gone')", pid);
    }

    interface Cond {
        boolean ok() throws Exception;
    }

    static void waitUntil(int secs, String what, Cond f) throws Exception {
        long deadline = System.nanoTime() + secs * 1_000_000_000L;
        while (!f.ok()) {
            if (System.nanoTime() > deadline) throw new AssertionError("timed out after " + secs + "s waiting for " + what);
            Thread.sleep(20);
        }
    }

    interface Action {
        void run() throws Exception;
    }

    /** The SQLState of what `a` throws, or "none". */
    static String sqlState(Action a) throws Exception {
        try {
            a.run();
            return "none";
        } catch (SQLException e) {
            return String.valueOf(e.getSQLState());
        }
    }

    static String other(String b) {
        return b.equals("main") ? "dev" : "main";
    }

    public static void main(String[] args) throws Exception {
        String branch = (String) one(proxy(), "select branch from marker");
        Connection d = direct(branch);

        CountingFactory.made.set(0);
        proxy().close();
        check("tls", (CountingFactory.made.get() > 0) == SSLMODE.equals("require"), "TLS sockets made: " + CountingFactory.made.get());

        for (String round : List.of("fresh", "reused")) {
            try (Connection c = proxy()) {
                int server = (Integer) one(c, "select pg_backend_pid()");
                check("pid_" + round, pid(c) == server, "getBackendPID=" + pid(c) + " server=" + server);
                check("pid_" + round + "_real", !state(d, server).equals("gone"), server);
            }
        }

        // prepareThreshold=1: server-prepared from the first execution.
        Connection c = proxy();
        try (Statement s = c.createStatement()) {
            s.execute("create temp table items(id int primary key, name text)");
        }
        try (PreparedStatement ins = c.prepareStatement("insert into items values (?, ?)")) {
            for (int i = 0; i < 1000; i++) {
                ins.setInt(1, i);
                ins.setString(2, "n" + i);
                ins.addBatch();
            }
            int[] counts = ins.executeBatch();
            check("batch", counts.length == 1000 && Arrays.stream(counts).allMatch(n -> n == 1), counts.length);
        }
        try (PreparedStatement q = c.prepareStatement("select name from items where id = ?")) {
            List<String> names = new ArrayList<>();
            for (int i = 0; i < 5; i++) {
                q.setInt(1, i);
                try (ResultSet rs = q.executeQuery()) {
                    rs.next();
                    names.add(rs.getString(1));
                }
            }
            check("prepared_results", names.equals(List.of("n0", "n1", "n2", "n3", "n4")), names);
            check("prepared_server_side", q.unwrap(PGStatement.class).isUseServerPrepare(), "not server-prepared");
        }
        check("prepared_on_server", ((Long) one(c, "select count(*) from pg_prepared_statements")) >= 1, "none");
        try (PreparedStatement ins = c.prepareStatement("insert into items values (?, ?)")) {
            for (int id : new int[] {5000, 1, 5001}) {
                ins.setInt(1, id);
                ins.setString(2, "dup?");
                ins.addBatch();
            }
            try {
                ins.executeBatch();
                check("batch_error", false, "duplicate key not reported");
            } catch (BatchUpdateException e) {
                check("batch_error", "23505".equals(e.getNextException() != null ? e.getNextException().getSQLState() : e.getSQLState()), e);
            }
        }
        check("batch_recovers", ((Long) one(c, "select count(*) from items")) == 1000, "rows");

        // COPY via CopyManager, both ways, rows spanning messages.
        CopyManager copy = c.unwrap(PGConnection.class).getCopyAPI();
        StringBuilder rows = new StringBuilder();
        for (int i = 0; i < 2000; i++) rows.append(i).append('\t').append("x".repeat(i % 3000)).append('\n');
        try (Statement s = c.createStatement()) {
            s.execute("create temp table big(id int, body text)");
        }
        long in = copy.copyIn("copy big from stdin", new StringReader(rows.toString()));
        check("copy_in", in == 2000, in);
        StringWriter out = new StringWriter();
        copy.copyOut("copy big to stdout", out);
        check("copy_out", out.toString().equals(rows.toString()), out.toString().length() + " chars back");

        // COPY streamed from one connection into another (the TLS stall).
        Connection a = proxy(), b = proxy();
        try (Statement s = a.createStatement()) {
            s.execute("create temp table src as select g as id, repeat('y', 5000) as body from generate_series(1, 500) g");
        }
        try (Statement s = b.createStatement()) {
            s.execute("create temp table dst(id int, body text)");
        }
        ExecutorService pool = Executors.newCachedThreadPool(r -> {
            Thread t = new Thread(r);
            t.setDaemon(true);
            return t;
        });
        for (int i = 0; i < 20; i++) {
            try (Statement s = b.createStatement()) {
                s.execute("truncate dst");
            }
            PipedInputStream pin = new PipedInputStream(64 * 1024);
            PipedOutputStream pout = new PipedOutputStream(pin);
            Future<Long> reader = pool.submit(() -> {
                try (pout) {
                    return a.unwrap(PGConnection.class).getCopyAPI().copyOut("copy src to stdout", pout);
                }
            });
            long n = b.unwrap(PGConnection.class).getCopyAPI().copyIn("copy dst from stdin", pin);
            reader.get(60, TimeUnit.SECONDS);
            if (n != 500) throw new AssertionError("piped COPY gave " + n + " rows");
        }
        passed.add("copy_pipe");

        // LISTEN/NOTIFY: pids are the senders' backend pids, ours included.
        try (Statement s = a.createStatement()) {
            s.execute("listen ch");
        }
        try (Statement s = b.createStatement()) {
            s.execute("notify ch, 'from-other'");
        }
        try (Statement s = a.createStatement()) {
            s.execute("notify ch, 'from-self'");
        }
        Map<String, Integer> got = new HashMap<>();
        long deadline = System.nanoTime() + 10_000_000_000L;
        while (got.size() < 2 && System.nanoTime() < deadline) {
            PGNotification[] ns = a.unwrap(PGConnection.class).getNotifications(500);
            if (ns != null) for (PGNotification n : ns) got.put(n.getParameter(), n.getPID());
        }
        check("notify_pid_other", Objects.equals(got.get("from-other"), pid(b)), got + " other=" + pid(b));
        check("notify_pid_self", Objects.equals(got.get("from-self"), pid(a)), got + " self=" + pid(a));

        // Cancel: Statement.cancel() uses the BackendKeyData the driver was given.
        Connection victim = proxy();
        int vpid = pid(victim);
        Statement sleeper = victim.createStatement();
        Future<String> sleeping = pool.submit(() -> sqlState(() -> sleeper.execute("select pg_sleep(60)")));
        waitUntil(10, "pg_sleep to run", () -> state(d, vpid).equals("active"));
        sleeper.cancel();
        check("cancel", sleeping.get(10, TimeUnit.SECONDS).equals("57014"), "not cancelled");
        check("cancel_then_usable", ((Integer) one(victim, "select 1")) == 1, "");

        // Terminate by pid, running and idle, direct and through the proxy.
        String runningDirect = terminateRunning(direct(branch), d, pool);
        String runningProxy = terminateRunning(proxy(), d, pool);
        check("terminate_running", runningDirect.equals(runningProxy) && runningDirect.equals("57P01"),
                "proxy " + runningProxy + ", direct " + runningDirect);
        String idleDirect = terminateIdle(direct(branch), d);
        String idleProxy = terminateIdle(proxy(), proxy());
        // Direct, pgjdbc's query may hit the socket the exited backend closed and fail with
        // 08006 before it reads the FATAL waiting there (a race CI lost once); when the write
        // goes first it reports 57P01. The proxy holds the client's socket open and always
        // passes the FATAL on: 57P01, what the direct session says whenever it gets to read.
        check("terminate_by_pid", idleProxy.equals("57P01")
                && (idleDirect.equals("57P01") || idleDirect.equals("08006")),
            "proxy " + idleProxy + ", direct " + idleDirect);

        // A branch switch: 57P01 for a used session, a fresh one moved.
        Connection used = proxy();
        one(used, "select 1");
        // Without assumeMinServerVersion pgjdbc sends `SET extra_float_digits = 3` right
        // after connecting, so its sessions have history at once; with it, that goes in the
        // startup packet and a session that has run nothing yet is moved.
        Connection freshDefault = proxy();
        Connection fresh = proxy("&assumeMinServerVersion=9.0");
        String[] use = System.getenv("PGTWIG_USE").replaceAll("[\\[\\]\"]", "").split(",");
        List<String> cmd = new ArrayList<>(List.of(use));
        cmd.add(other(branch));
        Process p = new ProcessBuilder(cmd).redirectErrorStream(true).start();
        String said = new String(p.getInputStream().readAllBytes());
        if (p.waitFor() != 0) throw new AssertionError("pgtwig use: " + said);
        String switched = sqlState(() -> one(used, "select 1"));
        check("switch_admin_shutdown", switched.equals("57P01"), switched);
        String freshDefaultState = sqlState(() -> one(freshDefault, "select 1"));
        check("switch_fresh_default_has_history", freshDefaultState.equals("57P01"), freshDefaultState);
        check("switch_fresh_moved", other(branch).equals(one(fresh, "select branch from marker")), "fresh session not moved");
        check("switch_new_sessions", other(branch).equals(one(proxy(), "select branch from marker")), "");

        StringBuilder json = new StringBuilder("{\"sslmode\":\"" + SSLMODE + "\",\"passed\":[");
        for (int i = 0; i < passed.size(); i++) json.append(i > 0 ? "," : "").append('"').append(passed.get(i)).append('"');
        System.out.println(json.append("]}"));
        System.exit(0);
    }

    static String terminateRunning(Connection v, Connection d, ExecutorService pool) throws Exception {
        int vpid = pid(v);
        Future<String> running = pool.submit(() -> sqlState(() -> v.createStatement().execute("select pg_sleep(60)")));
        waitUntil(10, "pg_sleep to run", () -> state(d, vpid).equals("active"));
        one(d, "select pg_terminate_backend(?)", vpid);
        return running.get(10, TimeUnit.SECONDS);
    }

    static String terminateIdle(Connection v, Connection killer) throws Exception {
        int vpid = pid(v);
        check("terminate_returns_true", Boolean.TRUE.equals(one(killer, "select pg_terminate_backend(?)", vpid)), vpid);
        Connection d = killer;
        waitUntil(10, "the victim backend to exit", () -> state(d, vpid).equals("gone"));
        return sqlState(() -> one(v, "select 1"));
    }
}
