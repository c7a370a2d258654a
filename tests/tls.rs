//! TLS end to end: a test CA made with rcgen, a throwaway PostgreSQL with
//! `ssl=on` (both connections, every sslmode, client certificates, password
//! failures) and a throwaway Redis with `--tls-port` (the sink over TLS).

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use cache_invalidator::pg;
use cache_invalidator::plan::Plan;
use cache_invalidator::sink::{RedisSink, RedisTls, SinkOptions};
use cache_invalidator::source::connection;
use cache_invalidator::source::conninfo::ConnectionSettings;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use redis::Commands;
use support::{free_port, PgCluster, PgOptions, RedisServer};

/// A CA and certificates it signed, as PEM files in one directory.
struct TestPki {
    dir: tempfile::TempDir,
}

impl TestPki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let pki = TestPki { dir };
        let (ca, ca_key) = pki.ca("ca");
        // The server name is deliberately not "localhost": verify-ca must accept
        // it through localhost, verify-full must not.
        pki.leaf(
            "server",
            &["db.test.invalid", "127.0.0.1"],
            "server",
            &ca,
            &ca_key,
        );
        pki.leaf("client", &[], "certuser", &ca, &ca_key);
        pki.ca("other-ca");
        pki
    }

    fn ca(&self, name: &str) -> (rcgen::Certificate, KeyPair) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("cache-invalidator test {name}"));
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        fs::write(self.path(&format!("{name}.pem")), cert.pem()).unwrap();
        (cert, key)
    }

    fn leaf(&self, name: &str, sans: &[&str], cn: &str, ca: &rcgen::Certificate, ca_key: &KeyPair) {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, ca, ca_key).unwrap();
        fs::write(self.path(&format!("{name}.crt")), cert.pem()).unwrap();
        let key_path = self.path(&format!("{name}.key"));
        fs::write(&key_path, key.serialize_pem()).unwrap();
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600)).unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// PostgreSQL refuses a key file not owned by its user with mode 0600:
    /// as root, hand the server's copies to `postgres`.
    fn server_files_for_postgres(&self) -> (PathBuf, PathBuf) {
        let dir = self.path("pg");
        fs::create_dir_all(&dir).unwrap();
        fs::copy(self.path("server.crt"), dir.join("server.crt")).unwrap();
        fs::copy(self.path("server.key"), dir.join("server.key")).unwrap();
        fs::copy(self.path("ca.pem"), dir.join("ca.pem")).unwrap();
        fs::set_permissions(dir.join("server.key"), fs::Permissions::from_mode(0o600)).unwrap();
        if unsafe { libc::geteuid() } == 0 {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown the server key to postgres");
        }
        (dir.join("server.crt"), dir.join("server.key"))
    }
}

fn tls_cluster(pki: &TestPki) -> PgCluster {
    let (cert, key) = pki.server_files_for_postgres();
    let ca = cert.with_file_name("ca.pem");
    let mut pg = PgCluster::start_with(
        PgOptions::default()
            .set("ssl", "on")
            .set("ssl_cert_file", &cert.display().to_string())
            .set("ssl_key_file", &key.display().to_string())
            .set("ssl_ca_file", &ca.display().to_string()),
    );
    pg.psql("CREATE ROLE certuser LOGIN REPLICATION");
    pg.psql("ALTER ROLE postgres PASSWORD 'right-horse-battery'");
    pg.set_hba(
        "local all all trust\n\
         hostssl all certuser 127.0.0.1/32 cert\n\
         host all all 127.0.0.1/32 scram-sha-256\n",
    );
    pg
}

fn settings(url: &str) -> ConnectionSettings {
    ConnectionSettings::parse(url, None).unwrap()
}

fn url(pg: &PgCluster, host: &str, user_pw: &str, query: &str) -> String {
    format!("postgres://{user_pw}@{host}:{}/postgres?{query}", pg.port())
}

/// Both connections succeed and the server sees them as TLS.
async fn assert_both_connect_over_tls(pg: &PgCluster, url: &str) {
    let s = settings(url);
    let conn = connection::connect(&s)
        .await
        .unwrap_or_else(|e| panic!("replication connection {url}: {e}"));
    let ssl = pg.psql(&format!(
        "SELECT ssl FROM pg_stat_ssl WHERE pid = {}",
        conn.backend_pid()
    ));
    assert_eq!(ssl, "t", "replication connection without TLS ({url})");
    conn.close().await;
    let sql = pg::connect(&s)
        .await
        .unwrap_or_else(|e| panic!("SQL connection {url}: {e}"));
    let row = sql
        .client()
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "SQL connection without TLS ({url})");
}

async fn both_fail(url: &str) -> (String, String) {
    let s = settings(url);
    let repl = connection::connect(&s)
        .await
        .map(|_| ())
        .expect_err("replication connection should fail")
        .to_string();
    let sql = pg::connect(&s)
        .await
        .map(|_| ())
        .expect_err("SQL connection should fail")
        .to_string();
    (repl, sql)
}

#[tokio::test]
async fn postgres_sslmodes_certificates_and_passwords() {
    let pki = TestPki::new();
    let pg = tls_cluster(&pki);
    let ca = pki.path("ca.pem").display().to_string();
    let pw = "postgres:right-horse-battery";

    // verify-full: chain and name (127.0.0.1 is in the certificate).
    let full = url(
        &pg,
        "127.0.0.1",
        pw,
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    assert_both_connect_over_tls(&pg, &full).await;

    // verify-full through a name the certificate does not carry fails; verify-ca passes.
    let (repl, sql) = both_fail(&url(
        &pg,
        "localhost",
        pw,
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await;
    for e in [&repl, &sql] {
        assert!(
            e.contains("certificate") && e.contains("TLS handshake"),
            "{e}"
        );
    }
    assert_both_connect_over_tls(
        &pg,
        &url(
            &pg,
            "localhost",
            pw,
            &format!("sslmode=verify-ca&sslrootcert={ca}"),
        ),
    )
    .await;

    // A wrong CA fails, and says so.
    let other = pki.path("other-ca.pem").display().to_string();
    let (repl, sql) = both_fail(&url(
        &pg,
        "127.0.0.1",
        pw,
        &format!("sslmode=verify-ca&sslrootcert={other}"),
    ))
    .await;
    for e in [&repl, &sql] {
        assert!(e.contains("certificate"), "{e}");
        assert!(!e.contains("right-horse-battery"), "{e}");
    }

    // require: TLS without a CA (no verification, as libpq).
    assert_both_connect_over_tls(&pg, &url(&pg, "127.0.0.1", pw, "sslmode=require")).await;
    // prefer: TLS when the server has it.
    assert_both_connect_over_tls(&pg, &url(&pg, "127.0.0.1", pw, "sslmode=prefer")).await;

    // Client certificate authentication (hostssl ... cert), no password.
    let client = format!(
        "sslmode=verify-full&sslrootcert={ca}&sslcert={}&sslkey={}",
        pki.path("client.crt").display(),
        pki.path("client.key").display()
    );
    assert_both_connect_over_tls(&pg, &url(&pg, "127.0.0.1", "certuser", &client)).await;

    // A wrong password says authentication failed, and never shows the password.
    let (repl, sql) = both_fail(&url(
        &pg,
        "127.0.0.1",
        "postgres:wrong-horse-battery",
        "sslmode=require",
    ))
    .await;
    for e in [&repl, &sql] {
        assert!(e.contains("authentication failed"), "{e}");
        assert!(!e.contains("wrong-horse-battery"), "{e}");
    }

    // The unix socket never uses TLS, whatever sslmode says.
    let socket = format!(
        "postgres://postgres@/postgres?host={}&port={}&sslmode=verify-full",
        pg.socket_dir().display(),
        pg.port()
    );
    let conn = connection::connect(&settings(&socket)).await.unwrap();
    conn.close().await;
}

#[tokio::test]
async fn postgres_without_tls_is_refused_by_require_and_used_by_prefer() {
    let pg = PgCluster::start();
    let (repl, sql) = both_fail(&url(&pg, "127.0.0.1", "postgres", "sslmode=require")).await;
    for e in [&repl, &sql] {
        assert!(
            e.contains("does not accept TLS") && e.contains("sslmode=require"),
            "{e}"
        );
    }
    let s = settings(&url(&pg, "127.0.0.1", "postgres", "sslmode=prefer"));
    connection::connect(&s).await.unwrap().close().await;
    pg::connect(&s).await.unwrap();
}

fn redis_tls(pki: &TestPki, auth_clients: &str) -> (RedisServer, u16) {
    let tls_port = free_port();
    let redis = RedisServer::start_with(&[
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        &pki.path("server.crt").display().to_string(),
        "--tls-key-file",
        &pki.path("server.key").display().to_string(),
        "--tls-ca-cert-file",
        &pki.path("ca.pem").display().to_string(),
        "--tls-auth-clients",
        auth_clients,
    ]);
    (redis, tls_port)
}

fn tls_options(port: u16, ca: &Path, client: Option<(&Path, &Path)>) -> SinkOptions {
    SinkOptions {
        url: format!("rediss://127.0.0.1:{port}/0"),
        password: None,
        wait_replicas: 0,
        redelete_after: None,
        tls: RedisTls {
            ca_file: Some(ca.to_path_buf()),
            cert_file: client.map(|c| c.0.to_path_buf()),
            key_file: client.map(|c| c.1.to_path_buf()),
        },
    }
}

#[tokio::test]
async fn redis_sink_applies_a_plan_over_tls_with_a_custom_ca() {
    let pki = TestPki::new();
    let (redis, port) = redis_tls(&pki, "optional");
    let mut c = redis.client().get_connection().unwrap();
    let _: () = c.set("user:1:profile", "x").unwrap();
    let mut sink = RedisSink::connect(&tls_options(port, &pki.path("ca.pem"), None))
        .await
        .unwrap();
    let mut plan = Plan::default();
    plan.keys.insert("user:1:profile");
    sink.apply(&plan).await.unwrap();
    assert!(!c.exists::<_, bool>("user:1:profile").unwrap());

    // Another CA: refused, the error names the certificate problem.
    let err = match RedisSink::connect(&tls_options(port, &pki.path("other-ca.pem"), None)).await {
        Ok(_) => panic!("a wrong CA must fail"),
        Err(e) => format!("{e} {:?}", std::error::Error::source(&e)),
    };
    assert!(
        err.to_lowercase().contains("certificate") || err.contains("UnknownIssuer"),
        "{err}"
    );
}

#[tokio::test]
async fn redis_client_certificate_when_the_server_requires_one() {
    let pki = TestPki::new();
    let (redis, port) = redis_tls(&pki, "yes");
    let mut c = redis.client().get_connection().unwrap();
    let _: () = c.set("k", "x").unwrap();
    let (cert, key) = (pki.path("client.crt"), pki.path("client.key"));
    let mut sink = RedisSink::connect(&tls_options(port, &pki.path("ca.pem"), Some((&cert, &key))))
        .await
        .unwrap();
    let mut plan = Plan::default();
    plan.keys.insert("k");
    sink.apply(&plan).await.unwrap();
    assert!(!c.exists::<_, bool>("k").unwrap());
    // Without the client certificate the server hangs up.
    let no_cert = tls_options(port, &pki.path("ca.pem"), None);
    let failed = match RedisSink::connect(&no_cert).await {
        Err(_) => true,
        Ok(mut s) => s.apply(&plan).await.is_err(),
    };
    assert!(
        failed,
        "a connection without a client certificate must fail"
    );
}
