//! Every error code, produced for real; after each one the connection and the server
//! keep working (a `ping` still gets its `pong`).

mod support;

use futures_util::SinkExt;
use serde_json::{json, Value};
use support::{TestDb, WsClient};
use tokio_tungstenite::tungstenite::Message;

async fn still_works(client: &mut WsClient, id: &str) {
    client.send(json!({"type": "ping", "id": id})).await;
    let pong = client.recv_reply(id).await;
    assert_eq!(pong["type"], "pong", "{pong}");
}

async fn expect_error(client: &mut WsClient, code: &str) -> Value {
    let error = client.recv_type("error").await;
    assert_eq!(error["code"], code, "{error}");
    assert!(!error["message"].as_str().unwrap().is_empty());
    error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_error_code_and_the_connection_survives() {
    let db = TestDb::create("errors").await;
    let sql = db.connect().await;
    sql.batch_execute(&format!(
        "CREATE TABLE untracked (id int PRIMARY KEY);
         CREATE TABLE secret (id int PRIMARY KEY, owner text); SELECT livesync.track('secret');
         ALTER TABLE secret ENABLE ROW LEVEL SECURITY;
         GRANT SELECT, INSERT, UPDATE, DELETE ON secret TO {app};
         CREATE TABLE hidden (id int PRIMARY KEY); SELECT livesync.track('hidden');
         CREATE TABLE grumpy (id int PRIMARY KEY, v int); SELECT livesync.track('grumpy');
         GRANT SELECT, INSERT, UPDATE, DELETE ON grumpy TO {app};
         CREATE FUNCTION grumpy_refuses() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.v = 1 THEN RAISE EXCEPTION 'internal trouble' USING ERRCODE = 'XX000'; END IF;
             IF NEW.v = 2 THEN RAISE EXCEPTION 'try again' USING ERRCODE = '40001'; END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER grumpy BEFORE INSERT ON grumpy FOR EACH ROW EXECUTE FUNCTION grumpy_refuses();",
        app = support::APP_ROLE
    ))
    .await
    .unwrap();
    let mut config = db.config();
    config.limits.max_frame_bytes = 4096;
    config.limits.max_subscriptions = 2;
    config.limits.messages_per_second = 1000;
    let bridge = support::start(config).await;

    let mut client = WsClient::connect(bridge.addr).await;
    // Before hello.
    client
        .send(json!({"type": "subscribe", "id": "s", "channel": "table:public.items"}))
        .await;
    expect_error(&mut client, "unauthorized").await;
    still_works(&mut client, "p0").await;
    client
        .send(json!({"type": "hello", "client_id": "c", "protocol": 1}))
        .await;
    client.recv_type("welcome").await;

    // bad_request: not JSON, unknown type, unknown field, binary, bad channel, bad filter.
    client.send_text("{nope".into()).await;
    expect_error(&mut client, "bad_request").await;
    client.send(json!({"type": "dance", "id": 1})).await;
    let e = expect_error(&mut client, "bad_request").await;
    assert_eq!(e["id"], 1);
    client
        .send(json!({"type": "subscribe", "id": "s", "channel": "table:public.items", "sinse": 3}))
        .await;
    expect_error(&mut client, "bad_request").await;
    client
        .ws
        .send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    expect_error(&mut client, "bad_request").await;
    client
        .send(json!({"type": "subscribe", "id": "s", "channel": "items"}))
        .await;
    expect_error(&mut client, "bad_request").await;
    client
        .send(json!({"type": "subscribe", "id": "s", "channel": "table:public.items", "filter": {"column": "title", "op": "eq", "value": "x"}}))
        .await;
    let e = expect_error(&mut client, "bad_request").await;
    assert!(
        e["message"].as_str().unwrap().contains("primary key"),
        "{e}"
    );
    client
        .send(json!({"type": "hello", "client_id": "c", "protocol": 1}))
        .await;
    expect_error(&mut client, "bad_request").await;
    still_works(&mut client, "p1").await;

    // not_found: no such table, an untracked one, an unknown subscription.
    client
        .send(json!({"type": "subscribe", "id": "s", "channel": "table:public.nope"}))
        .await;
    expect_error(&mut client, "not_found").await;
    client
        .send(json!({"type": "subscribe", "id": "s", "channel": "table:public.untracked"}))
        .await;
    let e = expect_error(&mut client, "not_found").await;
    assert!(e["message"].as_str().unwrap().contains("not tracked"));
    client
        .send(json!({"type": "unsubscribe", "id": "never"}))
        .await;
    expect_error(&mut client, "not_found").await;
    client.send(json!({"type": "write", "id": "w", "table": "nope", "op": "insert", "key": {"id": 1}, "values": {"id": 1}, "mutation_id": 1})).await;
    let e = expect_error(&mut client, "not_found").await;
    assert_eq!(e["sqlstate"], "42P01");

    // forbidden: no SELECT; row-level security.
    client
        .send(json!({"type": "subscribe", "id": "s", "channel": "table:public.hidden"}))
        .await;
    expect_error(&mut client, "forbidden").await;
    client
        .send(json!({"type": "subscribe", "id": "s", "channel": "table:public.secret"}))
        .await;
    let e = expect_error(&mut client, "forbidden").await;
    assert!(e["message"]
        .as_str()
        .unwrap()
        .contains("row-level security"));
    client
        .send(json!({"type": "snapshot", "id": "snap", "channel": "table:public.hidden"}))
        .await;
    let e = expect_error(&mut client, "forbidden").await;
    assert_eq!(e["sqlstate"], "42501");
    still_works(&mut client, "p2").await;

    // too_large: a frame over the limit; subscriptions over the limit.
    client
        .send(json!({"type": "ping", "id": "big", "pad": "x".repeat(5000)}))
        .await;
    expect_error(&mut client, "too_large").await;
    client
        .subscribe("a", "table:public.items", None, None)
        .await;
    client
        .subscribe("b", "table:public.scores", None, None)
        .await;
    client
        .send(json!({"type": "subscribe", "id": "c", "channel": "table:public.grumpy"}))
        .await;
    expect_error(&mut client, "too_large").await;
    still_works(&mut client, "p3").await;

    // resync_required: a position ahead of the log.
    client.send(json!({"type": "unsubscribe", "id": "b"})).await;
    assert_eq!(client.recv_reply("b").await["type"], "unsubscribed");
    client.send(json!({"type": "subscribe", "id": "b", "channel": "table:public.scores", "since": 1_000_000})).await;
    expect_error(&mut client, "resync_required").await;

    // internal and unavailable: what the database says, SQLSTATE kept.
    client.send(json!({"type": "write", "id": "g1", "table": "grumpy", "op": "insert", "key": {"id": 1}, "values": {"id": 1, "v": 1}, "mutation_id": 10})).await;
    let e = expect_error(&mut client, "internal").await;
    assert_eq!(e["sqlstate"], "XX000");
    assert_eq!(e["message"], "internal trouble");
    client.send(json!({"type": "write", "id": "g2", "table": "grumpy", "op": "insert", "key": {"id": 2}, "values": {"id": 2, "v": 2}, "mutation_id": 11})).await;
    let e = expect_error(&mut client, "unavailable").await;
    assert_eq!(e["sqlstate"], "40001");
    still_works(&mut client, "p4").await;
    bridge.shutdown().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn message_and_connection_rates_are_limited() {
    let db = TestDb::create("rates").await;
    let mut config = db.config();
    config.limits.messages_per_second = 10;
    config.limits.connections_per_ip = 2;
    let bridge = support::start(config).await;

    let (mut client, _) = WsClient::hello(bridge.addr, "flood").await;
    for i in 0..40 {
        client.send(json!({"type": "ping", "id": i})).await;
    }
    let mut pongs = 0;
    let mut limited = 0;
    while pongs + limited < 40 {
        let message = client.recv().await;
        match message["type"].as_str().unwrap() {
            "pong" => pongs += 1,
            "error" => {
                assert_eq!(message["code"], "rate_limited");
                limited += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(
        limited >= 20,
        "most of a burst over the rate is refused ({limited})"
    );
    assert!(pongs >= 9, "the allowance is served ({pongs})");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    still_works(&mut client, "after").await;

    // A second connection from the same address is admitted; a third is not.
    let (_second, _) = WsClient::hello(bridge.addr, "second").await;
    let mut third = WsClient::connect(bridge.addr).await;
    let refused = third.recv().await;
    assert_eq!(refused["code"], "rate_limited");
    assert!(third.recv_raw().await.is_none(), "then closed");
    // The first one still works.
    still_works(&mut client, "still").await;
    bridge.shutdown().await;
    db.drop_db().await;
}
