//! Event notifications, driven by the real curl: publish on the admin
//! listener, poll through the aggregate port (long poll and server-sent
//! events), retention and `missed`, bad input and limits, the `file` store
//! across `kill -9` of the real binary, and the `redis` store shared by two
//! relays. Every test starts its own relay (and redis-server) on free ports.

use std::time::{Duration, Instant};

use porthole_relay::events::conformance;
use porthole_relay::events::redis::RedisStore;
use porthole_relay::events::waiters::Waiters;
use porthole_suite::{
    config_with, wait_pollers, Curl, CurlOutput, RedisServer, Relay, RelayProcess,
};
use serde_json::Value;

async fn relay_with(events: &str) -> Relay {
    Relay::start(&config_with("", &format!("[events]\n{events}"))).await
}

async fn publish(admin_url: &str, topic: &str, body: &str) -> CurlOutput {
    Curl::new(&format!("{admin_url}/events/{topic}"))
        .args(&["-X", "POST", "--data-binary", "@-"])
        .header("Content-Type: application/json")
        .stdin(body.as_bytes().to_vec())
        .run()
        .await
}

/// Publishes and returns the id.
async fn publish_ok(admin_url: &str, topic: &str, body: &str) -> u64 {
    let out = publish(admin_url, topic, body).await;
    assert_eq!(out.status, 201, "{out:?}");
    json(&out)["id"].as_u64().expect("id")
}

/// `GET http://relay.test/events/{topic}?{query}` through the relay as a proxy.
fn poll(relay_url: &str, topic: &str, query: &str) -> Curl {
    Curl::new(&format!("http://relay.test/events/{topic}?{query}")).proxy(relay_url)
}

fn json(out: &CurlOutput) -> Value {
    serde_json::from_slice(&out.body).unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"))
}

fn ids(answer: &Value) -> Vec<u64> {
    answer["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["id"].as_u64().expect("id"))
        .collect()
}

#[tokio::test]
async fn publish_then_poll_ids_increase_by_one() {
    let relay = relay_with("").await;
    let admin = relay.admin_url();
    let out = publish(&admin, "plant-3", "{\"temp\": 71}").await;
    assert_eq!(
        (out.status, out.text().trim()),
        (201, "{\"id\":1}"),
        "{out:?}"
    );
    assert_eq!(publish_ok(&admin, "plant-3", "[1, 2]").await, 2);
    assert_eq!(publish_ok(&admin, "plant-3", "\"three\"").await, 3);
    assert_eq!(publish_ok(&admin, "other", "0").await, 1);

    let out = poll(&relay.url(), "plant-3", "after=0&wait=25").run().await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.header("content-type"), vec!["application/json"]);
    let answer = json(&out);
    assert_eq!(ids(&answer), vec![1, 2, 3]);
    assert_eq!(answer["next"], 3);
    assert_eq!(answer["events"][0]["data"], serde_json::json!({"temp": 71}));
    assert_eq!(answer["events"][2]["data"], "three");
    let time = answer["events"][0]["time"].as_str().expect("time");
    assert!(
        time.len() >= 20 && time.contains('T') && time.ends_with('Z'),
        "{time}"
    );
    assert!(answer.get("missed").is_none(), "{answer}");

    // By the relay's address (origin form), as well as by its name.
    let direct = Curl::new(&format!("{}/events/plant-3?after=2", relay.url()))
        .run()
        .await;
    assert_eq!(ids(&json(&direct)), vec![3], "{direct:?}");
    // Unknown paths of the relay itself stay 404.
    let other = Curl::new(&format!("{}/nothing", relay.url())).run().await;
    assert_eq!(other.status, 404);
}

#[tokio::test]
async fn long_poll_is_woken_by_a_publish() {
    let relay = relay_with("").await;
    let url = relay.url();
    let started = Instant::now();
    let waiting = tokio::spawn(async move { poll(&url, "t", "after=0&wait=20").run().await });
    wait_pollers(relay.admin, "t", 1).await;
    publish_ok(&relay.admin_url(), "t", "{\"n\":1}").await;
    let out = waiting.await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(ids(&json(&out)), vec![1]);
    assert!(
        elapsed < Duration::from_secs(10),
        "answered after {elapsed:?} of a 20 s wait"
    );
}

/// A waiting poll holds no read buffer (it watches its client one byte at
/// a time): a request pipelined behind it is still served after it, in
/// order, and a poller that hangs up is forgotten at once.
#[tokio::test]
async fn a_waiting_poll_keeps_a_pipelined_request_and_notices_a_hang_up() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let relay = relay_with("").await;
    let admin = relay.admin_url();
    let mut s = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let first =
        "GET http://relay.test/events/pipe?after=0&wait=20 HTTP/1.1\r\nHost: relay.test\r\n\r\n";
    s.write_all(first.as_bytes()).await.unwrap();
    porthole_suite::wait_pollers(relay.admin, "pipe", 1).await;
    // The next request arrives while the first one waits.
    let second = "GET http://relay.test/events/other?after=0 HTTP/1.1\r\nHost: relay.test\r\nConnection: close\r\n\r\n";
    s.write_all(second.as_bytes()).await.unwrap();
    assert_eq!(publish_ok(&admin, "pipe", "{\"n\":1}").await, 1);
    let mut both = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut both))
        .await
        .expect("both answers within 10 s")
        .unwrap();
    let answers: Vec<&str> = both.matches("HTTP/1.1 200 OK").collect();
    assert_eq!(answers.len(), 2, "{both}");
    let (one, two) = both.split_at(both.rfind("HTTP/1.1 200 OK").unwrap());
    assert!(
        one.contains("\"events\":[{\"id\":1"),
        "the poll's event first: {both}"
    );
    assert!(
        two.contains("\"events\":[]"),
        "then the pipelined poll: {both}"
    );

    // A poller that hangs up while it waits is dropped from the topic.
    let mut s = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let waiting =
        "GET http://relay.test/events/gone?after=0&wait=20 HTTP/1.1\r\nHost: relay.test\r\n\r\n";
    s.write_all(waiting.as_bytes()).await.unwrap();
    porthole_suite::wait_pollers(relay.admin, "gone", 1).await;
    drop(s);
    porthole_suite::wait_pollers(relay.admin, "gone", 0).await;
}

#[tokio::test]
async fn no_event_within_the_wait_and_a_plain_poll() {
    let relay = relay_with("").await;
    publish_ok(&relay.admin_url(), "t", "1").await;

    let started = Instant::now();
    let out = poll(&relay.url(), "t", "after=1&wait=1").run().await;
    let elapsed = started.elapsed();
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(json(&out), serde_json::json!({"events": [], "next": 1}));
    assert!(
        elapsed >= Duration::from_millis(900),
        "returned after {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "returned after {elapsed:?}"
    );

    let started = Instant::now();
    let out = poll(&relay.url(), "t", "after=1&wait=0").run().await;
    assert_eq!(json(&out), serde_json::json!({"events": [], "next": 1}));
    assert!(started.elapsed() < Duration::from_millis(900));
}

#[tokio::test]
async fn server_sent_events_resume_after_last_event_id() {
    let relay = relay_with("").await;
    let admin = relay.admin_url();
    for i in 1..=3 {
        publish_ok(&admin, "t", &format!("{{\"n\":{i}}}")).await;
    }
    let sse = |extra: &'static str, secs| {
        let curl = poll(&relay.url(), "t", "")
            .header("Accept: text/event-stream")
            .max_time(secs);
        if extra.is_empty() {
            curl
        } else {
            curl.header(extra)
        }
    };
    // The stream never ends by itself: curl stops it at --max-time.
    let out = sse("", 1).run().await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.header("content-type"), vec!["text/event-stream"]);
    // Dated like the relay's other own answers (RFC 9110 6.6.1; the audit's L5).
    let date = out.header("date");
    assert!(
        date.len() == 1 && httpdate::parse_http_date(&date[0]).is_ok(),
        "{out:?}"
    );
    let text = out.text();
    for i in 1..=3 {
        assert!(
            text.contains(&format!("id: {i}\ndata: {{\"id\":{i},")),
            "{text}"
        );
    }
    assert!(text.contains("\"data\":{\"n\":2}}\n\n"), "{text}");

    let out = sse("Last-Event-ID: 2", 1).run().await;
    let text = out.text();
    assert!(
        text.contains("id: 3\n") && !text.contains("id: 2\n"),
        "{text}"
    );

    // Live: a stream resumed after 3 receives 4 as it is published.
    let curl = sse("Last-Event-ID: 3", 3);
    let live = tokio::spawn(curl.run());
    wait_pollers(relay.admin, "t", 1).await;
    publish_ok(&admin, "t", "{\"n\":4}").await;
    let text = live.await.unwrap().text();
    assert!(
        text.contains("id: 4\ndata: ") && !text.contains("id: 3\n"),
        "{text}"
    );
}

/// The rows of the admin status page's topic table: (topic, last id, pollers).
async fn status_topics(admin_url: &str) -> Vec<(String, u64, usize)> {
    let page = Curl::new(&format!("{admin_url}/status")).run().await.text();
    page.split("<tr><td>")
        .skip(1)
        .filter_map(|row| {
            let cells: Vec<&str> = row
                .split("</td>")
                .map(|c| c.rsplit('>').next().unwrap_or(c))
                .collect();
            Some((
                cells.first()?.to_string(),
                cells.get(1)?.parse().ok()?,
                cells.get(2)?.parse().ok()?,
            ))
        })
        .collect()
}

/// Polls, long polls and event streams of names no one ever published leave
/// no topic behind once they end (the audit's M1: each stayed on the status
/// page, and in memory, for good); a topic without events shows only while
/// someone waits on it, and that waiter still gets what is published.
async fn polling_unpublished_topics_leaves_nothing(events: &str) {
    let relay = relay_with(events).await;
    let (url, admin) = (relay.url(), relay.admin_url());
    publish_ok(&admin, "real", "1").await;
    let mut clients = Vec::new();
    for i in 0..20 {
        clients.push(tokio::spawn(
            poll(&url, &format!("zz-ghost-p{i}"), "after=0").run(),
        ));
        clients.push(tokio::spawn(
            poll(&url, &format!("zz-ghost-l{i}"), "after=0&wait=0.3").run(),
        ));
        let stream = poll(&url, &format!("zz-ghost-s{i}"), "")
            .header("Accept: text/event-stream")
            .max_time(1);
        clients.push(tokio::spawn(stream.run()));
    }
    for client in clients {
        let out = client.await.unwrap();
        assert_eq!(out.status, 200, "{out:?}");
    }
    let only_real = vec![("real".to_string(), 1, 0)];
    let gone = porthole_suite::eventually(Duration::from_secs(10), || async {
        status_topics(&admin).await == only_real
    })
    .await;
    let rows = status_topics(&admin).await;
    assert!(gone, "topics left behind by pollers: {rows:?}");

    let waiting = tokio::spawn(poll(&url, "zz-new", "after=0&wait=20").run());
    wait_pollers(relay.admin, "zz-new", 1).await;
    assert_eq!(
        status_topics(&admin).await,
        vec![("real".to_string(), 1, 0), ("zz-new".to_string(), 0, 1)]
    );
    publish_ok(&admin, "zz-new", "{\"n\":1}").await;
    let out = waiting.await.unwrap();
    assert_eq!(ids(&json(&out)), vec![1], "{out:?}");
    assert_eq!(
        status_topics(&admin).await,
        vec![("real".to_string(), 1, 0), ("zz-new".to_string(), 1, 0)]
    );
}

#[tokio::test]
async fn polling_unpublished_topics_leaves_nothing_in_the_memory_store() {
    polling_unpublished_topics_leaves_nothing("").await;
}

#[tokio::test]
async fn polling_unpublished_topics_leaves_nothing_in_the_file_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events");
    polling_unpublished_topics_leaves_nothing(&format!(
        "store = \"file\"\npath = \"{}\"",
        path.display()
    ))
    .await;
    let mut files: Vec<String> = std::fs::read_dir(&path)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, [".lock", "real.log", "zz-new.log"]);
}

#[tokio::test]
async fn a_poller_behind_the_retention_learns_the_exact_missed_count() {
    let relay = relay_with("retain = 3").await;
    for _ in 0..10 {
        publish_ok(&relay.admin_url(), "t", "{}").await;
    }
    let answer = json(&poll(&relay.url(), "t", "after=0").run().await);
    assert_eq!(ids(&answer), vec![8, 9, 10]);
    assert_eq!(
        (answer["missed"].as_u64(), answer["next"].as_u64()),
        (Some(7), Some(10))
    );
    let answer = json(&poll(&relay.url(), "t", "after=8").run().await);
    assert_eq!(ids(&answer), vec![9, 10]);
    assert!(answer.get("missed").is_none());
    // The stream reports it as an event of its own.
    let out = poll(&relay.url(), "t", "after=5")
        .header("Accept: text/event-stream")
        .max_time(1)
        .run()
        .await;
    assert!(
        out.text()
            .contains("event: missed\ndata: {\"missed\":2}\n\n"),
        "{out:?}"
    );
}

/// A poller ahead of the store (the audit's M4): it saw ids up to 5, the
/// relay restarted with a new memory store whose ids start again at 1. It
/// gets the new events marked `"reset":true` instead of `{"events":[],
/// "next":2}` forever; a long poll waiting from before the first new event
/// is woken by it; an event stream resumed beyond the last id is told too.
#[tokio::test]
async fn a_poller_ahead_of_a_restarted_store_gets_the_new_events_marked_reset() {
    let old = relay_with("").await;
    for i in 1..=5 {
        assert_eq!(
            publish_ok(&old.admin_url(), "t", &format!("{{\"n\":{i}}}")).await,
            i
        );
    }
    let addr = old.addr;
    old.shutdown().await;
    // The same address, a new (empty) memory store.
    let relay = Relay::start_at(&config_with("", "[events]\n"), addr).await;
    let url = relay.url();

    let started = Instant::now();
    let waiting = tokio::spawn(poll(&url, "t", "after=5&wait=20").run());
    wait_pollers(relay.admin, "t", 1).await;
    assert_eq!(publish_ok(&relay.admin_url(), "t", "{\"n\":6}").await, 1);
    assert_eq!(publish_ok(&relay.admin_url(), "t", "{\"n\":7}").await, 2);
    let out = waiting.await.unwrap();
    assert_eq!(out.status, 200, "{out:?}");
    let answer = json(&out);
    assert_eq!(ids(&answer).first(), Some(&1), "{answer}");
    assert_eq!(answer["events"][0]["data"], serde_json::json!({"n": 6}));
    assert_eq!(answer["reset"], true, "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered after {:?} of a 20 s wait",
        started.elapsed()
    );

    let answer = json(&poll(&url, "t", "after=5").run().await);
    assert_eq!(ids(&answer), vec![1, 2], "{answer}");
    assert_eq!(
        (answer["next"].as_u64(), answer["reset"].as_bool()),
        (Some(2), Some(true))
    );
    assert!(
        answer.get("missed").is_none(),
        "nothing was dropped: {answer}"
    );
    // From the store's position on, the usual answers.
    let answer = json(&poll(&url, "t", "after=2").run().await);
    assert_eq!(answer, serde_json::json!({"events": [], "next": 2}));

    let out = poll(&url, "t", "")
        .header("Accept: text/event-stream")
        .header("Last-Event-ID: 5")
        .max_time(1)
        .run()
        .await;
    let text = out.text();
    assert!(
        text.contains("event: missed\ndata: {\"missed\":0,\"reset\":true}\n\nid: 1\ndata: ")
            && text.contains("id: 2\ndata: "),
        "{text}"
    );

    // A topic the new store has no event on yet: a plain poll is told at once.
    let answer = json(&poll(&url, "u", "after=3").run().await);
    assert_eq!(
        answer,
        serde_json::json!({"events": [], "next": 0, "reset": true})
    );
}

#[tokio::test]
async fn bad_bodies_and_names_are_refused_and_nothing_is_stored() {
    let relay = relay_with("max_event_bytes = 100").await;
    let admin = relay.admin_url();
    let out = publish(&admin, "t", "{\"temp\": 71").await;
    assert_eq!(out.status, 400, "{out:?}");
    assert!(out.text().contains("not one JSON value"), "{}", out.text());
    assert_eq!(publish(&admin, "t", "{} {}").await.status, 400);
    assert_eq!(publish(&admin, "t", "").await.status, 400);

    let big = format!("\"{}\"", "x".repeat(200));
    let out = publish(&admin, "t", &big).await;
    assert_eq!(out.status, 413, "{out:?}");
    assert!(out.text().contains("max_event_bytes"), "{}", out.text());
    // Chunked, so the size is only known while reading.
    let out = Curl::new(&format!("{admin}/events/t"))
        .args(&[
            "-X",
            "POST",
            "--data-binary",
            "@-",
            "-H",
            "Transfer-Encoding: chunked",
        ])
        .stdin(big.into_bytes())
        .run()
        .await;
    assert_eq!(out.status, 413, "{out:?}");

    let long = "a".repeat(129);
    for topic in ["a:b", "a%20b", long.as_str()] {
        assert_eq!(
            publish(&admin, topic, "1").await.status,
            400,
            "publish {topic}"
        );
        assert_eq!(
            poll(&relay.url(), topic, "").run().await.status,
            400,
            "poll {topic}"
        );
    }
    assert_eq!(poll(&relay.url(), "t", "after=x").run().await.status, 400);
    let post = poll(&relay.url(), "t", "")
        .args(&["-X", "POST", "-d", "1"])
        .run()
        .await;
    assert_eq!(post.status, 405, "publishing is not on the aggregate port");

    let answer = json(&poll(&relay.url(), "t", "after=0").run().await);
    assert_eq!(answer, serde_json::json!({"events": [], "next": 0}));
}

#[tokio::test]
async fn poller_limits_answer_503_with_retry_after() {
    let relay = relay_with("max_pollers_per_topic = 1\nmax_pollers = 2").await;
    let url = relay.url();
    let first = tokio::spawn(poll(&url, "a", "wait=20").run());
    wait_pollers(relay.admin, "a", 1).await;
    let out = poll(&url, "a", "wait=20").run().await;
    assert_eq!(out.status, 503, "{out:?}");
    assert_eq!(out.header("retry-after"), vec!["1"]);
    assert!(
        out.text().contains("max_pollers_per_topic"),
        "{}",
        out.text()
    );

    let second = tokio::spawn(poll(&url, "b", "wait=20").run());
    wait_pollers(relay.admin, "b", 1).await;
    let out = poll(&url, "c", "wait=0").run().await;
    assert_eq!(out.status, 503, "{out:?}");
    assert!(out.text().contains("events.max_pollers"), "{}", out.text());

    publish_ok(&relay.admin_url(), "a", "1").await;
    publish_ok(&relay.admin_url(), "b", "1").await;
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(second.await.unwrap().status, 200);
    assert_eq!(
        poll(&url, "c", "wait=0").run().await.status,
        200,
        "slots are given back"
    );
}

#[tokio::test]
async fn a_draining_relay_answers_waiting_polls_at_once() {
    let relay = relay_with("").await;
    let url = relay.url();
    let waiting = tokio::spawn(poll(&url, "t", "wait=30").run());
    wait_pollers(relay.admin, "t", 1).await;
    let started = Instant::now();
    relay.shutdown().await;
    let out = waiting.await.unwrap();
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(json(&out)["events"], serde_json::json!([]));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "drain took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn file_store_keeps_events_across_kill_9_and_ids_continue() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("relay.toml");
    let text = format!(
        "[relay]\nname = \"relay.test\"\n[events]\nstore = \"file\"\npath = \"{}\"\n",
        dir.path().join("events").display()
    );
    std::fs::write(&conf, text).unwrap();

    let mut relay = RelayProcess::spawn(&conf, &[]).await;
    for i in 1..=3 {
        assert_eq!(
            publish_ok(&relay.admin_url(), "plant-3", &format!("{{\"n\":{i}}}")).await,
            i
        );
    }
    // One relay per directory: a second relay on it stops at start and names
    // the first; the first goes on giving out ids.
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], porthole_suite::free_port()));
    let log = porthole_suite::start_refused(&conf, listen).await;
    let holder = format!("in use by another relay (process {} holds it)", relay.pid());
    assert!(log.contains(&holder), "{log}");
    assert_eq!(
        publish_ok(&relay.admin_url(), "plant-3", "{\"n\":4}").await,
        4
    );
    relay.child.start_kill().unwrap(); // SIGKILL: no chance to flush anything
    relay.child.wait().await.unwrap();

    let relay = RelayProcess::spawn(&conf, &[]).await;
    let answer = json(&poll(&relay.url(), "plant-3", "after=0").run().await);
    assert_eq!(ids(&answer), vec![1, 2, 3, 4], "{}", relay.log_text());
    assert_eq!(answer["events"][3]["data"], serde_json::json!({"n": 4}));
    assert_eq!(publish_ok(&relay.admin_url(), "plant-3", "5").await, 5);
}

fn redis_events(url: &str) -> String {
    format!("store = \"redis\"\nredis_url = \"{url}\"")
}

#[tokio::test]
async fn redis_store_is_shared_by_two_relays() {
    let redis = RedisServer::start().await;
    let one = relay_with(&redis_events(&redis.url())).await;
    let two = relay_with(&redis_events(&redis.url())).await;

    let url = two.url();
    let started = Instant::now();
    let waiting = tokio::spawn(poll(&url, "plant-3", "after=0&wait=20").run());
    wait_pollers(two.admin, "plant-3", 1).await;
    assert_eq!(
        publish_ok(&one.admin_url(), "plant-3", "{\"temp\":71}").await,
        1
    );
    let out = waiting.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "woken after {:?}",
        started.elapsed()
    );
    let answer = json(&out);
    assert_eq!(ids(&answer), vec![1], "{out:?}");
    assert_eq!(answer["events"][0]["data"], serde_json::json!({"temp": 71}));

    assert_eq!(publish_ok(&two.admin_url(), "plant-3", "2").await, 2);
    assert_eq!(publish_ok(&one.admin_url(), "plant-3", "3").await, 3);
    let from_one = json(&poll(&one.url(), "plant-3", "after=0").run().await);
    let from_two = json(&poll(&two.url(), "plant-3", "after=0").run().await);
    assert_eq!(ids(&from_one), vec![1, 2, 3]);
    assert_eq!(from_one, from_two);
}

/// With redis down, polls and publishes get a prompt `503` with
/// `Retry-After: 1` (not an answer after the client gave up), and the store
/// connects as soon as redis is there.
#[tokio::test]
async fn redis_down_is_a_prompt_503_and_served_once_it_is_back() {
    let port = porthole_suite::free_port();
    let relay = relay_with(&redis_events(&format!("redis://127.0.0.1:{port}/0"))).await;
    let started = Instant::now();
    let polled = poll(&relay.url(), "plant-3", "after=0&wait=20").run().await;
    assert_eq!(polled.status, 503, "{polled:?}");
    assert_eq!(polled.header("retry-after"), ["1"]);
    assert!(polled.text().contains("redis"), "{}", polled.text());
    let published = publish(&relay.admin_url(), "plant-3", "1").await;
    assert_eq!(published.status, 503, "{published:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered after {:?}",
        started.elapsed()
    );

    let _redis = RedisServer::start_on(port).await;
    assert_eq!(publish_ok(&relay.admin_url(), "plant-3", "1").await, 1);
    let answer = json(&poll(&relay.url(), "plant-3", "after=0").run().await);
    assert_eq!(ids(&answer), vec![1]);
}

/// A publish sent to a redis that does not answer (the audit's M3: it was
/// `503`, "retry is safe", and stored once redis went on, so a retrying
/// publisher stored it twice) is `504`, outcome unknown, without
/// `Retry-After`; the event is stored exactly once when redis resumes.
#[tokio::test]
async fn a_publish_redis_took_and_did_not_answer_is_504_outcome_unknown() {
    let redis = RedisServer::start().await;
    let relay = relay_with(&redis_events(&redis.url())).await;
    let admin = relay.admin_url();
    assert_eq!(publish_ok(&admin, "r1", "{\"n\":1}").await, 1);

    redis.signal("STOP");
    let started = Instant::now();
    let out = publish(&admin, "r1", "{\"n\":3}").await;
    redis.signal("CONT");
    assert_eq!(out.status, 504, "{out:?}");
    assert!(out.header("retry-after").is_empty(), "{out:?}");
    let text = out.text();
    assert!(
        text.contains("redis event store, topic r1")
            && text.contains("outcome unknown: the event may have been stored"),
        "{text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered after {:?}",
        started.elapsed()
    );

    // Redis ran it on resuming: the event is there once, and ids go on.
    let answer = json(&poll(&relay.url(), "r1", "after=1&wait=5").run().await);
    assert_eq!(ids(&answer), vec![2], "{answer}");
    assert_eq!(answer["events"][0]["data"], serde_json::json!({"n": 3}));
    assert_eq!(publish_ok(&admin, "r1", "{\"n\":4}").await, 3);
    let answer = json(&poll(&relay.url(), "r1", "after=0").run().await);
    assert_eq!(ids(&answer), vec![1, 2, 3], "{answer}");
}

#[tokio::test]
async fn redis_store_conformance() {
    let redis = RedisServer::start().await;
    for case in conformance::CASES {
        let store = RedisStore::open(&redis.url(), case.retention(), Waiters::default()).unwrap();
        conformance::run_case(&store, case).await;
    }
}
