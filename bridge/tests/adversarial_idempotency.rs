//! Adversarial: idempotency keys across users. `client_id` is whatever the client
//! says in `hello` (or in the HTTP batch body), not bound to the token's `sub`; with
//! `mutation_id` it decides whether a write is "a retry" (docs/protocol.md: "a retry
//! returns the first result and changes nothing").

mod support;

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::{TestDb, WsClient, APP_ROLE};

const SECRET: &str = "adversarial-secret-long-enough-for-hs256";

fn token(sub: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": sub, "role": APP_ROLE, "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

async fn hello(addr: std::net::SocketAddr, client_id: &str, sub: &str) -> WsClient {
    let mut c = WsClient::connect(addr).await;
    c.send(json!({"type": "hello", "client_id": client_id, "token": token(sub), "protocol": 1}))
        .await;
    assert_eq!(c.recv().await["type"], "welcome");
    c
}

/// DEFECT (silent write loss across users): the idempotency key is (client_id,
/// mutation_id), and client_id is not tied to the authenticated `sub`. Mallory, with
/// a valid token of her own, says hello as Bob's client id and spends Bob's next
/// mutation ids on harmless writes; Bob's real writes with those ids then return
/// Mallory's results ("applied") and change nothing. (Honest clients that happen to
/// share a client id, e.g. a library default, lose writes the same way.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]

async fn another_users_write_is_never_taken_for_a_retry() {
    let db = TestDb::create("adv_idem").await;
    let mut config = db.config();
    config.jwt_secret = Some(SECRET.into());
    let bridge = support::start(config).await;
    let sql = db.connect().await;
    sql.batch_execute("INSERT INTO items VALUES (1, 0, 'bob''s', 0)")
        .await
        .unwrap();

    let mut mallory = hello(bridge.addr, "bob-phone", "mallory").await;
    mallory
        .send(json!({"type": "write", "id": "m", "table": "items", "op": "delete", "key": {"id": 424242}, "mutation_id": 13}))
        .await;
    let r = mallory.recv_reply("m").await;
    eprintln!("mallory, as client bob-phone, mutation 13: {r}");

    let mut bob = hello(bridge.addr, "bob-phone", "bob").await;
    bob.send(json!({"type": "write", "id": "b", "table": "items", "op": "delete", "key": {"id": 1}, "mutation_id": 13}))
        .await;
    let r = bob.recv_reply("b").await;
    let still: i64 = sql
        .query_one("SELECT count(*) FROM items WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    eprintln!(
        "bob's delete of row 1, mutation 13: {r}; row 1 still there: {}",
        still == 1
    );
    assert_eq!(still, 0, "bob was told {r} but his row was not deleted");
    let _: Value = r;
    bridge.shutdown().await;
    db.drop_db().await;
}
