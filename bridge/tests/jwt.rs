//! With a JWT key configured: `hello` needs a valid token (HS256 or RS256, `exp`
//! checked); its `sub` is the actor, its `role` the Postgres role of writes and
//! snapshots, its claims in `request.jwt.claims`; the HTTP API wants the same token.

mod support;

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::{TestDb, WsClient, APP_ROLE, BRIDGE_ROLE, VIEWER_ROLE};

const SECRET: &str = "test-secret-that-is-long-enough";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn hs256(claims: Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

async fn hello_with(addr: std::net::SocketAddr, token: Option<&str>) -> (WsClient, Value) {
    let mut client = WsClient::connect(addr).await;
    let mut hello = json!({"type": "hello", "client_id": "jwt-client", "protocol": 1});
    if let Some(token) = token {
        hello["token"] = token.into();
    }
    client.send(hello).await;
    let reply = client.recv().await;
    (client, reply)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_decide_who_connects_and_as_whom_statements_run() {
    let db = TestDb::create("jwt").await;
    let sql = db.connect().await;
    sql.batch_execute(&format!(
        "ALTER TABLE items ADD COLUMN claims text DEFAULT current_setting('request.jwt.claims', true);
         GRANT livesync_maintainer TO {BRIDGE_ROLE};"
    ))
    .await
    .unwrap();
    let mut config = db.config();
    config.jwt_secret = Some(SECRET.into());
    config.default_role = Some(VIEWER_ROLE.into());
    let bridge = support::start(config).await;

    // No token, an expired one, a forged one: unauthorized, then closed.
    for token in [
        None,
        Some(hs256(json!({"sub": "ann", "exp": now() - 600}))),
        Some(
            encode(
                &Header::new(Algorithm::HS256),
                &json!({"sub": "ann", "exp": now() + 600}),
                &EncodingKey::from_secret(b"not-the-secret").unwrap(),
            )
            .unwrap(),
        ),
    ] {
        let (mut client, reply) = hello_with(bridge.addr, token.as_deref()).await;
        assert_eq!(reply["code"], "unauthorized", "{reply}");
        assert!(
            client.recv_raw().await.is_none(),
            "closed after unauthorized"
        );
    }

    // A token without a role runs as the default role (the viewer): may subscribe,
    // may not write.
    let viewer = hs256(json!({"sub": "vic", "exp": now() + 600}));
    let (mut client, welcome) = hello_with(bridge.addr, Some(&viewer)).await;
    assert_eq!(welcome["type"], "welcome");
    client
        .subscribe("s", "table:public.items", None, None)
        .await;
    client
        .send(json!({"type": "write", "id": "w", "table": "items", "op": "insert", "key": {"id": 1}, "values": {"id": 1}, "mutation_id": 1}))
        .await;
    assert_eq!(client.recv_reply("w").await["code"], "forbidden");

    // A token naming the app role writes, as its sub, with its claims visible to SQL.
    let writer = hs256(json!({"sub": "ann", "role": APP_ROLE, "team": 7, "exp": now() + 600}));
    let (mut author, welcome) = hello_with(bridge.addr, Some(&writer)).await;
    assert_eq!(welcome["type"], "welcome");
    author
        .send(json!({"type": "write", "id": "w", "table": "items", "op": "insert", "key": {"id": 1}, "values": {"id": 1, "title": "by ann"}, "mutation_id": 1}))
        .await;
    let result = author.recv_reply("w").await;
    assert_eq!(result["status"], "applied", "{result}");
    let claims: String = sql
        .query_one("SELECT claims FROM items WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    let claims: Value = serde_json::from_str(&claims).unwrap();
    assert_eq!(claims["sub"], "ann");
    assert_eq!(claims["team"], 7);
    // The viewer's subscription hears it, with ann as the actor.
    let change = client.recv_changes().await;
    assert_eq!(change["changes"][0]["actor"], "ann");

    // A role that does not exist (or the bridge may not switch to): forbidden.
    let stranger = hs256(json!({"sub": "sam", "role": "no_such_role_here", "exp": now() + 600}));
    let (mut sam, _) = hello_with(bridge.addr, Some(&stranger)).await;
    sam.send(json!({"type": "write", "id": "w", "table": "items", "op": "insert", "key": {"id": 2}, "values": {"id": 2}, "mutation_id": 1}))
        .await;
    let refused = sam.recv_reply("w").await;
    assert_eq!(refused["code"], "forbidden", "{refused}");
    sam.send(json!({"type": "subscribe", "id": "s", "channel": "table:public.items"}))
        .await;
    assert_eq!(sam.recv_reply("s").await["code"], "forbidden");

    // HTTP: health is open; the rest wants the token.
    let http = reqwest::Client::new();
    let base = format!("http://{}", bridge.addr);
    assert_eq!(
        http.get(format!("{base}/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    for path in ["/metrics", "/api/v1/sync/stats"] {
        let anonymous = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(anonymous.status(), 401, "{path}");
        let with_token = http
            .get(format!("{base}{path}"))
            .bearer_auth(&viewer)
            .send()
            .await
            .unwrap();
        assert_eq!(with_token.status(), 200, "{path}");
    }
    let cleanup = format!("{base}/api/v1/sync/cleanup");
    let refused = http
        .post(&cleanup)
        .bearer_auth(&writer)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403, "the app role is no maintainer");
    let maintainer = hs256(json!({"sub": "ops", "role": BRIDGE_ROLE, "exp": now() + 600}));
    let done = http
        .post(&cleanup)
        .bearer_auth(&maintainer)
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 200);
    let done: Value = done.json().await.unwrap();
    assert!(done["removed_changes"].as_i64().is_some(), "{done}");

    bridge.shutdown().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rs256_tokens_verify_with_the_public_key() {
    let dir = std::env::temp_dir().join(format!("livesync-rs256-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let private = dir.join("private.pem");
    let public = dir.join("public.pem");
    let ok = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&private)
        .status()
        .unwrap()
        .success()
        && std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&private)
            .arg("-out")
            .arg(&public)
            .status()
            .unwrap()
            .success();
    assert!(ok, "openssl makes a key pair");
    let db = TestDb::create("jwt_rs256").await;
    let mut config = db.config();
    config.jwt_public_key = Some(std::fs::read_to_string(&public).unwrap());
    let bridge = support::start(config).await;
    let key = EncodingKey::from_rsa_pem(&std::fs::read(&private).unwrap()).unwrap();
    let token = encode(
        &Header::new(Algorithm::RS256),
        &json!({"sub": "rita", "exp": now() + 600}),
        &key,
    )
    .unwrap();
    let (_client, welcome) = hello_with(bridge.addr, Some(&token)).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    // HS256 is not accepted when only an RS256 key is configured.
    let (_client, reply) = hello_with(
        bridge.addr,
        Some(&hs256(json!({"sub": "x", "exp": now() + 600}))),
    )
    .await;
    assert_eq!(reply["code"], "unauthorized");
    bridge.shutdown().await;
    db.drop_db().await;
}
