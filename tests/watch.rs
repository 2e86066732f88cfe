//! `porthole-shim events watch TOPIC`, the real binary against a relay:
//! events printed once each and in order across a restart of the watcher
//! (state file), `missed` on stderr when the state is behind the retention,
//! a relay that goes away and comes back on the same port, `503` with
//! `Retry-After`, bad topics and state files refused before any request, and
//! a relay that requires TLS (`--relay https://... --ca`).
//! The watcher's stdout is read line by line with a timeout.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use porthole_suite::{
    binary, config_with, eventually, wait_pollers, Curl, CurlOutput, Relay, RelayProcess,
};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

// The certificate fixtures of the security tests (a CA made per test).
#[allow(dead_code)]
mod security_support;
use security_support::{Ca, Dir};

const LINE_WAIT: Duration = Duration::from_secs(20);

async fn publish(admin_url: &str, topic: &str, body: &str) -> CurlOutput {
    Curl::new(&format!("{admin_url}/events/{topic}"))
        .args(&["-X", "POST", "--data-binary", "@-"])
        .header("Content-Type: application/json")
        .stdin(body.as_bytes().to_vec())
        .run()
        .await
}

async fn publish_ok(admin_url: &str, topic: &str, body: &str) -> u64 {
    let out = publish(admin_url, topic, body).await;
    assert_eq!(out.status, 201, "{out:?}");
    let answer: Value = serde_json::from_slice(&out.body).expect("JSON");
    answer["id"].as_u64().expect("id")
}

/// A temporary directory with a `shim.toml` naming the relay `relay.test`
/// (the relay's address comes from `--relay`).
fn workdir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("shim.toml");
    std::fs::write(&conf, "relay_name = \"relay.test\"\n").expect("write shim.toml");
    (dir, conf)
}

/// A running `porthole-shim events watch`: its stdout lines arrive on a
/// channel, its stderr accumulates.
struct Watcher {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl Watcher {
    fn spawn(conf: &Path, relay: SocketAddr, topic: &str, state: &Path) -> Watcher {
        Watcher::spawn_with(conf, &[&relay.to_string()], topic, state)
    }

    /// `relay`: the `--relay` value, then further global flags.
    fn spawn_with(conf: &Path, relay: &[&str], topic: &str, state: &Path) -> Watcher {
        let mut child = Command::new(binary("porthole-shim"))
            .arg("--config")
            .arg(conf)
            .arg("--relay")
            .args(relay)
            .args(["events", "watch", topic, "--wait", "5", "--state"])
            .arg(state)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn porthole-shim");
        let (tx, lines) = mpsc::unbounded_channel();
        let stdout = child.stdout.take().expect("stdout");
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let (err_pipe, sink) = (child.stderr.take().expect("stderr"), stderr.clone());
        tokio::spawn(async move {
            let mut reader = BufReader::new(err_pipe).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let mut text = sink.lock().expect("stderr lock");
                text.push_str(&line);
                text.push('\n');
            }
        });
        Watcher {
            child,
            lines,
            stderr,
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr lock").clone()
    }

    /// The next stdout line, parsed; panics (with stderr) after [`LINE_WAIT`].
    async fn next_event(&mut self) -> Value {
        let line = match tokio::time::timeout(LINE_WAIT, self.lines.recv()).await {
            Ok(Some(line)) => line,
            Ok(None) => panic!("stdout closed; stderr:\n{}", self.stderr()),
            Err(_) => panic!("no line within {LINE_WAIT:?}; stderr:\n{}", self.stderr()),
        };
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not one JSON line ({e}): {line}"))
    }

    /// The ids of the next `n` lines.
    async fn next_ids(&mut self, n: usize) -> Vec<u64> {
        let mut ids = Vec::new();
        for _ in 0..n {
            ids.push(self.next_event().await["id"].as_u64().expect("id"));
        }
        ids
    }

    async fn stderr_shows(&self, text: &str, limit: Duration) {
        let found = eventually(limit, || async { self.stderr().contains(text) }).await;
        assert!(found, "stderr never showed {text:?}:\n{}", self.stderr());
    }

    /// Sends `sig` and waits for the exit; every remaining stdout line is returned.
    async fn stop(mut self, sig: &str) -> (ExitStatus, Vec<String>, String) {
        let pid = self.child.id().expect("watcher still running");
        let killed = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .expect("kill(1)");
        assert!(killed.success());
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("no exit after SIG{sig}:\n{}", self.stderr()))
            .expect("wait");
        let mut rest = Vec::new();
        while let Ok(Some(line)) =
            tokio::time::timeout(Duration::from_secs(5), self.lines.recv()).await
        {
            rest.push(line);
        }
        let stderr = self.stderr();
        (status, rest, stderr)
    }
}

async fn state_is(path: &Path, id: u64) {
    let want = format!("{id}\n");
    let ok = eventually(Duration::from_secs(10), || async {
        std::fs::read_to_string(path).is_ok_and(|t| t == want)
    })
    .await;
    assert!(
        ok,
        "state file holds {:?}, not {want:?}",
        std::fs::read_to_string(path)
    );
}

#[tokio::test]
async fn events_print_once_each_in_order_and_resume_after_a_restart() {
    let relay = Relay::start(&config_with("", "")).await;
    let admin = relay.admin_url();
    let (dir, conf) = workdir();
    let state = dir.path().join("state/plant-3.last");

    publish_ok(&admin, "plant-3", "{\"temp\": 71}").await;
    publish_ok(&admin, "plant-3", "[1, 2]").await;
    let mut watcher = Watcher::spawn(&conf, relay.addr, "plant-3", &state);
    let first = watcher.next_event().await;
    assert_eq!(first["id"], 1);
    assert_eq!(first["data"], serde_json::json!({"temp": 71}));
    assert!(
        first["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{first}"
    );
    assert_eq!(
        watcher.next_event().await["data"],
        serde_json::json!([1, 2])
    );
    // A long poll woken by a publication.
    publish_ok(&admin, "plant-3", "\"three\"").await;
    let third = watcher.next_event().await;
    assert_eq!((&third["id"], &third["data"]), (&3.into(), &"three".into()));
    state_is(&state, 3).await;

    let (status, rest, stderr) = watcher.stop("TERM").await;
    assert!(status.success(), "{status:?}\n{stderr}");
    assert!(rest.is_empty(), "{rest:?}");

    publish_ok(&admin, "plant-3", "4").await;
    publish_ok(&admin, "plant-3", "5").await;
    let mut watcher = Watcher::spawn(&conf, relay.addr, "plant-3", &state);
    assert_eq!(watcher.next_ids(2).await, vec![4, 5]);
    // Nothing else was printed in between: the next line is the next event.
    publish_ok(&admin, "plant-3", "6").await;
    assert_eq!(watcher.next_ids(1).await, vec![6]);
    state_is(&state, 6).await;
    let (status, rest, stderr) = watcher.stop("INT").await;
    assert!(status.success(), "{status:?}\n{stderr}");
    assert!(rest.is_empty(), "{rest:?}");
    assert!(!stderr.contains("missed"), "{stderr}");
}

#[tokio::test]
async fn a_state_behind_the_retention_reports_the_exact_missed_count() {
    let relay = Relay::start(&config_with("", "[events]\nretain = 3")).await;
    let admin = relay.admin_url();
    for i in 1..=10 {
        assert_eq!(publish_ok(&admin, "t", &i.to_string()).await, i);
    }
    let (dir, conf) = workdir();
    let state = dir.path().join("t.last");
    std::fs::write(&state, "2\n").unwrap();
    let mut watcher = Watcher::spawn(&conf, relay.addr, "t", &state);
    // Ids 3..=7 are gone for good: 5 missed; 8, 9, 10 are printed.
    assert_eq!(watcher.next_ids(3).await, vec![8, 9, 10]);
    watcher
        .stderr_shows("missed: 5 ", Duration::from_secs(10))
        .await;
    state_is(&state, 10).await;
    let (status, _, stderr) = watcher.stop("TERM").await;
    assert!(status.success(), "{status:?}\n{stderr}");
    assert_eq!(stderr.matches("missed:").count(), 1, "{stderr}");
}

#[tokio::test]
async fn bad_topics_and_state_files_are_refused_before_any_request() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let relay = listener.local_addr().unwrap();
    let (dir, conf) = workdir();
    let corrupt = dir.path().join("corrupt.last");
    std::fs::write(&corrupt, "seven\n").unwrap();
    let long = "x".repeat(129);
    let cases: &[(&str, &Path, i32, &str)] = &[
        ("plant/3", &dir.path().join("a"), 64, "is not a topic name"),
        ("", &dir.path().join("b"), 64, "is not a topic name"),
        (&long, &dir.path().join("c"), 64, "is not a topic name"),
        ("ok", &corrupt, 1, "`seven` is not an event id"),
    ];
    for (topic, state, code, message) in cases {
        let out = Command::new(binary("porthole-shim"))
            .arg("--config")
            .arg(&conf)
            .args(["--relay", &relay.to_string(), "events", "watch", topic])
            .arg("--state")
            .arg(state)
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(*code), "{topic}: {stderr}");
        assert!(stderr.contains(message), "{topic}: {stderr}");
        assert!(out.stdout.is_empty());
        assert!(!state.exists() || *state == corrupt.as_path());
    }
    let accepted = listener.accept();
    assert!(
        matches!(&accepted, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a refused watcher connected to the relay: {accepted:?}"
    );
}

#[tokio::test]
async fn the_watcher_keeps_trying_while_the_relay_is_down_and_resumes_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let relay_conf = dir.path().join("relay.toml");
    let text = format!(
        "[relay]\nname = \"relay.test\"\n[events]\nstore = \"file\"\npath = \"{}\"\n",
        dir.path().join("events").display()
    );
    std::fs::write(&relay_conf, text).unwrap();
    let mut relay = RelayProcess::spawn(&relay_conf, &[]).await;
    let (addr, admin) = (relay.addr, relay.admin);

    let (_shim_dir, conf) = workdir();
    let state = dir.path().join("t.last");
    let mut watcher = Watcher::spawn(&conf, addr, "t", &state);
    publish_ok(&relay.admin_url(), "t", "1").await;
    assert_eq!(watcher.next_ids(1).await, vec![1]);

    relay.child.start_kill().unwrap();
    relay.child.wait().await.unwrap();
    watcher
        .stderr_shows("unreachable: cannot connect", Duration::from_secs(20))
        .await;
    // It keeps trying: a second failed attempt is logged too.
    let tries = eventually(Duration::from_secs(20), || async {
        watcher.stderr().matches("retrying in").count() >= 2
    })
    .await;
    assert!(tries, "{}", watcher.stderr());

    let relay = RelayProcess::spawn_on(&relay_conf, addr, admin, &[], &[]).await;
    publish_ok(&relay.admin_url(), "t", "2").await;
    publish_ok(&relay.admin_url(), "t", "3").await;
    assert_eq!(watcher.next_ids(2).await, vec![2, 3]);
    state_is(&state, 3).await;
    let (status, rest, stderr) = watcher.stop("TERM").await;
    assert!(status.success(), "{status:?}\n{stderr}");
    assert!(rest.is_empty(), "{rest:?}");
    assert!(stderr.contains("polling again"), "{stderr}");
}

/// A relay whose memory store started again numbers its events from 1: the
/// watcher, ahead of it, prints them (the relay marks its answer `reset`)
/// instead of dropping every id at or below the last one it printed.
#[tokio::test]
async fn after_a_memory_relay_restarts_its_new_events_are_printed() {
    let dir = tempfile::tempdir().unwrap();
    let relay_conf = dir.path().join("relay.toml");
    std::fs::write(&relay_conf, "[relay]\nname = \"relay.test\"\n").unwrap();
    let mut relay = RelayProcess::spawn(&relay_conf, &[]).await;
    let (addr, admin) = (relay.addr, relay.admin);
    let (_shim_dir, conf) = workdir();
    let state = dir.path().join("t.last");
    let mut watcher = Watcher::spawn(&conf, addr, "t", &state);
    for n in 1..=3 {
        publish_ok(&relay.admin_url(), "t", &n.to_string()).await;
    }
    assert_eq!(watcher.next_ids(3).await, vec![1, 2, 3]);

    relay.child.start_kill().unwrap();
    relay.child.wait().await.unwrap();
    let relay = RelayProcess::spawn_on(&relay_conf, addr, admin, &[], &[]).await;
    publish_ok(&relay.admin_url(), "t", "\"new 1\"").await;
    publish_ok(&relay.admin_url(), "t", "\"new 2\"").await;
    let first = watcher.next_event().await;
    let second = watcher.next_event().await;
    assert_eq!(
        (first["id"].as_u64(), second["id"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(first["data"], "new 1");
    state_is(&state, 2).await;
    let (status, _, stderr) = watcher.stop("TERM").await;
    assert!(status.success(), "{status:?}\n{stderr}");
}

#[tokio::test]
async fn a_full_relay_is_asked_again_after_retry_after() {
    let relay = Relay::start(&config_with("", "[events]\nmax_pollers_per_topic = 1")).await;
    // Another client holds the topic's only poller slot.
    let url = relay.url();
    let holder = tokio::spawn(async move {
        Curl::new("http://relay.test/events/t?after=0&wait=30")
            .proxy(&url)
            .run()
            .await
    });
    wait_pollers(relay.admin, "t", 1).await;

    let (dir, conf) = workdir();
    let mut watcher = Watcher::spawn(&conf, relay.addr, "t", &dir.path().join("t.last"));
    watcher
        .stderr_shows("503 Service Unavailable", Duration::from_secs(10))
        .await;
    assert!(
        watcher.stderr().contains("retrying in 1s"),
        "{}",
        watcher.stderr()
    );
    // The publication answers the holder, which frees the slot.
    publish_ok(&relay.admin_url(), "t", "{\"n\":1}").await;
    assert_eq!(holder.await.unwrap().status, 200);
    let event = watcher.next_event().await;
    assert_eq!(
        (&event["id"], &event["data"]),
        (&1.into(), &serde_json::json!({"n": 1}))
    );
    let (status, _, stderr) = watcher.stop("TERM").await;
    assert!(status.success(), "{status:?}\n{stderr}");
}

#[tokio::test]
async fn the_watcher_polls_a_relay_that_requires_tls() {
    let (files, ca) = (Dir::new(), Ca::new("relay ca"));
    let leaf = ca.server(&["127.0.0.1"]);
    let tls = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\nrequire = true\n",
        files.write("relay.pem", &leaf.cert),
        files.write("relay.key", &leaf.key)
    );
    let log = files.0.join("access.log");
    let logged = format!("{tls}[log]\naccess = \"{}\"\n", log.display());
    let relay = Relay::start(&config_with("", &logged)).await;
    let ca_file = files.write("ca.pem", &ca.pem());
    let (dir, conf) = workdir();
    let state = dir.path().join("t.last");
    let https = format!("https://{}", relay.addr);
    let mut watcher = Watcher::spawn_with(&conf, &[&https, "--ca", &ca_file], "t", &state);
    let id = publish_ok(&relay.admin_url(), "t", "\"over tls\"").await;
    let event = watcher.next_event().await;
    assert_eq!(
        (&event["id"], &event["data"]),
        (&id.into(), &"over tls".into())
    );
    // The polls name no scheme: an `http://` URI over TLS named the wrong one.
    let polls = || porthole_suite::lines_with(&log, "/events/t?after=");
    let answered = || async { !polls().is_empty() };
    assert!(porthole_suite::eventually(Duration::from_secs(5), answered).await);
    let polls = polls();
    for line in &polls {
        assert!(line.contains("target=\"/events/t?after="), "{line}");
    }
}

/// A relay that requires users answers the watcher's polls once the shim's
/// `credentials_file` (here in `shim.toml`) gives it the user's credentials.
#[tokio::test]
async fn the_watcher_polls_a_relay_that_requires_users_with_the_credentials_file() {
    let dir = Dir::new();
    let users = porthole_relay::secret::passwd_line("alice", "watch-pw").unwrap();
    let users = dir.write("users", &format!("{users}\n"));
    let auth = format!("[auth]\nusers_file = \"{users}\"\nrequired = true\n");
    let relay = Relay::start(&config_with("", &auth)).await;
    let admin = relay.admin_url();
    let credentials = dir.write("credentials", "alice:watch-pw\n");
    let conf = dir.write(
        "shim.toml",
        &format!("relay_name = \"relay.test\"\ncredentials_file = \"{credentials}\"\n"),
    );
    let state = dir.0.join("users.last");

    publish_ok(&admin, "plant-9", "{\"temp\": 70}").await;
    let mut watcher = Watcher::spawn(Path::new(&conf), relay.addr, "plant-9", &state);
    let first = watcher.next_event().await;
    assert_eq!(
        (&first["id"], &first["data"]["temp"]),
        (&1.into(), &70.into())
    );
    let (_, _, stderr) = watcher.stop("TERM").await;
    assert!(!stderr.contains("watch-pw"), "{stderr}");
}
