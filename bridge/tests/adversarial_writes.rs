//! Adversarial: malformed and hostile writes; hostile role claims. Each gets the
//! documented error; nothing changes; the connection keeps working.

mod support;

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::{TestDb, WsClient};

const SECRET: &str = "adversarial-secret-long-enough-for-hs256";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_writes_and_role_claims() {
    let db = TestDb::create("adv_writes").await;
    let sql = db.connect().await;
    sql.batch_execute("INSERT INTO items VALUES (1, 0, 'one', 0)")
        .await
        .unwrap();
    let bridge = db.start_bridge().await;
    let (mut c, _) = WsClient::hello(bridge.addr, "hostile").await;
    let mut failures = Vec::new();
    let big = "y".repeat(900_000);
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"table": "items", "op": "update", "key": {"id": 1}, "values": {"score": "abc"}, "mutation_id": 1}),
            "bad_request",
        ),
        (
            json!({"table": "items", "op": "update", "key": {"id": "x"}, "values": {"title": "t"}, "mutation_id": 2}),
            "bad_request",
        ),
        (
            json!({"table": "items", "op": "update", "values": {"title": "t"}, "mutation_id": 3}),
            "bad_request",
        ),
        (
            json!({"table": "items", "op": "update", "key": {"id": 1}, "values": {"title": "t"}}),
            "bad_request",
        ),
        (
            json!({"table": "items", "op": "update", "key": {"id": 1}, "values": {"title": "t"}, "mutation_id": "4"}),
            "bad_request",
        ),
        (
            json!({"table": "items", "op": "merge", "key": {"id": 1}, "values": {"title": "t"}, "mutation_id": 5}),
            "bad_request",
        ),
        (
            json!({"table": "items", "op": "update", "key": {"id": 1, "x": 2}, "values": {"title": "t"}, "mutation_id": 6}),
            "bad_request",
        ),
        (
            json!({"table": "items", "op": "update", "key": {"id": 1}, "values": [1, 2], "mutation_id": 7}),
            "bad_request",
        ),
        (
            json!({"table": "items", "op": "update", "key": {"id": 1}, "values": {"nope": 1}, "mutation_id": 8}),
            "bad_request",
        ),
        (
            json!({"table": "items", "op": "update", "key": {"id": 1}, "values": {"_livesync_version": 1}, "mutation_id": 9}),
            "bad_request",
        ),
        (
            json!({"table": "items", "op": "update", "key": {"id": 1}, "values": {"id": 2}, "mutation_id": 10}),
            "bad_request",
        ),
        (
            json!({"table": "items", "op": "update", "key": {"id": 1}, "values": {"score": 99999999999i64}, "mutation_id": 11}),
            "bad_request",
        ),
        (
            json!({"table": "items", "op": "update", "key": {"id": 1}, "values": {"title": "t"}, "hlc": "yesterday", "mutation_id": 12}),
            "bad_request",
        ),
        (
            json!({"table": "livesync.changes", "op": "delete", "key": {"position": 1}, "mutation_id": 13}),
            "forbidden",
        ),
        (
            json!({"table": "items", "op": "update", "key": {"id": 1}, "values": {"title": big}, "mutation_id": 14}),
            "applied",
        ),
    ];
    for (i, (mut w, expect)) in cases.into_iter().enumerate() {
        let id = format!("w{i}");
        w["type"] = "write".into();
        w["id"] = id.clone().into();
        c.send(w.clone()).await;
        let r = c.recv_reply(&id).await;
        let got = r["status"]
            .as_str()
            .or(r["code"].as_str())
            .unwrap_or("?")
            .to_string();
        let mut shown = w.to_string();
        shown.truncate(150);
        eprintln!(
            "{} {shown} → {got} {} {}",
            if got == expect { "ok  " } else { "FAIL" },
            r["sqlstate"],
            r["message"]
                .as_str()
                .map(|m| &m[..m.len().min(100)])
                .unwrap_or("")
        );
        if got != expect {
            failures.push(format!("{shown} → {r}"));
        }
    }
    let title: String = sql
        .query_one("SELECT left(title, 3) FROM items WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(title, "yyy");
    bridge.shutdown().await;

    // Role claims that look like SQL, or name roles the bridge cannot become.
    let mut config = db.config();
    config.jwt_secret = Some(SECRET.into());
    let bridge = support::start(config).await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    for role in [
        "x\"; DROP TABLE items; --",
        "livesync_test_app'; RESET ROLE; --",
        "pg_write_server_files",
        "livesync_reader",
    ] {
        let t = encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": "eve", "role": role, "exp": exp}),
            &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
        )
        .unwrap();
        let mut c = WsClient::connect(bridge.addr).await;
        c.send(json!({"type": "hello", "client_id": "eve", "token": t, "protocol": 1}))
            .await;
        assert_eq!(c.recv().await["type"], "welcome");
        c.send(json!({"type": "write", "id": "w", "table": "items", "op": "delete", "key": {"id": 1}, "mutation_id": 1})).await;
        let w = c.recv_reply("w").await;
        c.send(json!({"type": "snapshot", "id": "q", "channel": "table:public.items"}))
            .await;
        let q = c.recv_reply("q").await;
        c.send(json!({"type": "subscribe", "id": "s", "channel": "table:public.items"}))
            .await;
        let s = c.recv_reply("s").await;
        eprintln!(
            "role {role:?}: write {} / snapshot {} / subscribe {}",
            w["code"],
            q["code"],
            if s["type"] == "subscribed" {
                "SUBSCRIBED".into()
            } else {
                s["code"].to_string()
            }
        );
        if w["code"] != "forbidden" || q["code"] != "forbidden" || s["type"] == "subscribed" {
            failures.push(format!("role {role}: {w} {q} {s}"));
        }
    }
    let still: i64 = sql
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(still, 1);
    bridge.shutdown().await;
    db.drop_db().await;
    eprintln!("{} failures", failures.len());
    assert!(failures.is_empty(), "{failures:#?}");
}
