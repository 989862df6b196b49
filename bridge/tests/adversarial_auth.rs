//! Adversarial: who may stream what. docs/protocol.md "Subscribing": the connection's
//! role needs SELECT (else `forbidden`); a table with row-level security streams only
//! to roles that bypass it — "never a row their policies hide". The jwt test says a
//! role "the bridge may not switch to" is forbidden.

mod support;

use std::time::Duration;

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::{TestDb, WsClient, APP_ROLE, BRIDGE_ROLE, VIEWER_ROLE};

const SECRET: &str = "adversarial-secret-long-enough-for-hs256";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn token(claims: Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

async fn hello(addr: std::net::SocketAddr, token: &str) -> WsClient {
    let mut client = WsClient::connect(addr).await;
    client
        .send(json!({"type": "hello", "client_id": "adv", "token": token, "protocol": 1}))
        .await;
    let welcome = client.recv().await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    client
}

async fn try_subscribe(client: &mut WsClient, id: &str, channel: &str) -> Value {
    client
        .send(json!({"type": "subscribe", "id": id, "channel": channel}))
        .await;
    client.recv_reply(id).await
}

/// Waits up to `wait` for a `changes` message; None if none came.
async fn maybe_changes(client: &mut WsClient, wait: Duration) -> Option<Value> {
    tokio::time::timeout(wait, client.recv_type("changes"))
        .await
        .ok()
}

async fn setup(db: &TestDb) {
    let sql = db.connect().await;
    sql.batch_execute(&format!(
        "CREATE TABLE vault (id int PRIMARY KEY, pin text); SELECT livesync.track('vault');
         CREATE TABLE secret (id int PRIMARY KEY, owner text); SELECT livesync.track('secret');
         ALTER TABLE secret ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own ON secret USING (owner = current_setting('request.jwt.claims', true)::json->>'sub');
         GRANT SELECT, INSERT, UPDATE, DELETE ON secret TO {APP_ROLE};
         CREATE TABLE notes (id int PRIMARY KEY, owner text); SELECT livesync.track('notes');
         GRANT SELECT, INSERT, UPDATE, DELETE ON notes TO {APP_ROLE};
         GRANT SELECT ON notes TO {VIEWER_ROLE};"
    ))
    .await
    .unwrap();
}

/// DEFECT: `subscribe` decides access with `catalog::stream_access` for the role the
/// token names (pg/catalog.rs, `has_table_privilege(r.oid, …)` and `rolsuper OR
/// rolbypassrls`) but never checks that the bridge's login role may switch to that
/// role (snapshots and writes do, through `set_config('role', …)`, and are refused).
/// A token whose role claim names a superuser (here `postgres`, of which the bridge
/// is no member) streams every tracked table: one no application role may read, and
/// one with row-level security, every row. `pg_read_all_data` (no member either)
/// streams every table without row-level security.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]

async fn a_role_the_bridge_cannot_become_does_not_stream() {
    let db = TestDb::create("adv_superrole").await;
    setup(&db).await;
    let mut config = db.config();
    config.jwt_secret = Some(SECRET.into());
    let bridge = support::start(config).await;
    let sql = db.connect().await;

    let mut problems = Vec::new();
    for (n, role) in ["postgres", "pg_read_all_data"].into_iter().enumerate() {
        let t = token(json!({"sub": "mallory", "role": role, "exp": now() + 600}));
        let mut client = hello(bridge.addr, &t).await;
        // A snapshot as that role is refused: the bridge cannot SET ROLE to it.
        client
            .send(json!({"type": "snapshot", "id": "q", "channel": "table:public.vault"}))
            .await;
        let snap = client.recv_reply("q").await;
        eprintln!("{role}: snapshot {}", snap["code"]);
        assert_eq!(snap["code"], "forbidden");
        let vault = try_subscribe(&mut client, "v", "table:public.vault").await;
        let secret = try_subscribe(&mut client, "s", "table:public.secret").await;
        eprintln!("{role}: subscribe vault → {vault}");
        eprintln!("{role}: subscribe secret (RLS) → {secret}");
        let id = n as i32 + 1;
        sql.execute("INSERT INTO vault VALUES ($1, '0000')", &[&id])
            .await
            .unwrap();
        sql.execute("INSERT INTO secret VALUES ($1, 'alice')", &[&id])
            .await
            .unwrap();
        let leaked = maybe_changes(&mut client, Duration::from_secs(3)).await;
        eprintln!("{role}: streamed {leaked:?}");
        if vault["code"] != "forbidden" || secret["code"] != "forbidden" || leaked.is_some() {
            problems.push(role);
        }
    }
    assert!(
        problems.is_empty(),
        "streamed to role claims the bridge cannot become: {problems:?}"
    );
    bridge.shutdown().await;
    db.drop_db().await;
}

/// DEFECT (leak): access is decided once, at `subscribe`. Enabling row-level security
/// on a subscribed table, or revoking SELECT, does not stop the stream: the app role
/// keeps receiving rows its policies now hide / it may no longer read, until it
/// reconnects (a new subscribe is refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]

async fn rls_enabled_or_select_revoked_after_subscribing_stops_the_stream() {
    let db = TestDb::create("adv_rls_after").await;
    setup(&db).await;
    let mut config = db.config();
    config.jwt_secret = Some(SECRET.into());
    let bridge = support::start(config).await;
    let sql = db.connect().await;

    let app = token(json!({"sub": "bob", "role": APP_ROLE, "exp": now() + 600}));
    let viewer = token(json!({"sub": "vic", "role": VIEWER_ROLE, "exp": now() + 600}));
    let mut bob = hello(bridge.addr, &app).await;
    bob.subscribe("n", "table:public.notes", None, None).await;
    let mut vic = hello(bridge.addr, &viewer).await;
    vic.subscribe("n", "table:public.notes", None, None).await;

    sql.batch_execute(&format!(
        "ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own ON notes USING (owner = current_setting('request.jwt.claims', true)::json->>'sub');
         REVOKE SELECT ON notes FROM {VIEWER_ROLE};
         INSERT INTO notes VALUES (1, 'alice');"
    ))
    .await
    .unwrap();
    // bob's policies hide alice's note; vic may no longer read notes at all.
    let bob_got = maybe_changes(&mut bob, Duration::from_secs(3)).await;
    let vic_got = maybe_changes(&mut vic, Duration::from_secs(3)).await;
    eprintln!("bob (RLS now hides the row): {bob_got:?}");
    eprintln!("vic (SELECT revoked): {vic_got:?}");
    // What a fresh subscribe says for the same roles:
    let mut bob2 = hello(bridge.addr, &app).await;
    let fresh = try_subscribe(&mut bob2, "n", "table:public.notes").await;
    eprintln!("a fresh subscribe as bob: {fresh}");
    assert_eq!(fresh["code"], "forbidden");
    assert!(bob_got.is_none(), "a row bob's policies hide reached bob");
    assert!(vic_got.is_none(), "a row reached a role without SELECT");
    bridge.shutdown().await;
    db.drop_db().await;
}

/// The role claim `none` is `SET ROLE NONE` for `set_config('role', …)`: statements
/// then run as the bridge's own login role (a member of every application role, with
/// their privileges inherited) instead of being refused like any unknown role.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_role_claim_none_is_refused() {
    let db = TestDb::create("adv_role_none").await;
    setup(&db).await;
    let sql = db.connect().await;
    // A table only a role the bridge serves (and is a member of) may read.
    sql.batch_execute(&format!(
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'adv_hr') THEN CREATE ROLE adv_hr NOLOGIN; END IF; END $$;
         GRANT adv_hr TO {BRIDGE_ROLE};
         CREATE TABLE payroll (id int PRIMARY KEY, salary int); SELECT livesync.track('payroll');
         GRANT SELECT, INSERT, UPDATE, DELETE ON payroll TO adv_hr;
         INSERT INTO payroll VALUES (1, 250000);"
    ))
    .await
    .unwrap();
    let mut config = db.config();
    config.jwt_secret = Some(SECRET.into());
    let bridge = support::start(config).await;

    let mut wrong = Vec::new();
    // "none" (any case) is refused at hello: SET ROLE none would mean the bridge's own.
    for role in ["none", "NONE"] {
        let t = token(json!({"sub": "eve", "role": role, "exp": now() + 600}));
        let mut client = WsClient::connect(bridge.addr).await;
        client
            .send(json!({"type": "hello", "client_id": "adv", "token": t, "protocol": 1}))
            .await;
        let refused = client.recv().await;
        assert_eq!(refused["code"], "unauthorized", "{refused}");
    }
    for role in ["no_such_role"] {
        let t = token(json!({"sub": "eve", "role": role, "exp": now() + 600}));
        let mut client = hello(bridge.addr, &t).await;
        client
            .send(json!({"type": "snapshot", "id": "q", "channel": "table:public.payroll"}))
            .await;
        let snap = client.recv_reply("q").await;
        client
            .send(json!({"type": "write", "id": "w", "table": "payroll", "op": "update", "key": {"id": 1}, "values": {"salary": 1}, "mutation_id": 1}))
            .await;
        let write = client.recv_reply("w").await;
        let sub = try_subscribe(&mut client, "s", "table:public.payroll").await;
        eprintln!("role {role:?}: snapshot {snap}\n  write {write}\n  subscribe {sub}");
        if snap["code"] != "forbidden" || write["code"] != "forbidden" {
            wrong.push(role);
        }
    }
    bridge.shutdown().await;
    db.drop_db().await;
    let admin = support::connect(&format!("{} dbname=postgres", support::server())).await;
    let _ = admin.batch_execute("DROP ROLE IF EXISTS adv_hr").await;
    assert!(
        wrong.is_empty(),
        "snapshot/write not refused for role claims {wrong:?}"
    );
}

/// `exp` is checked at `hello` only: a connection whose token expired keeps writing
/// and streaming for as long as it stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_token_stops_working() {
    let db = TestDb::create("adv_exp").await;
    let mut config = db.config();
    config.jwt_secret = Some(SECRET.into());
    let bridge = support::start(config).await;
    let t = token(json!({"sub": "ann", "role": APP_ROLE, "exp": now() + 1}));
    let mut client = hello(bridge.addr, &t).await;
    tokio::time::sleep(Duration::from_secs(8)).await; // past exp + 5 s leeway
    client
        .send(json!({"type": "write", "id": "w", "table": "items", "op": "insert", "key": {"id": 1}, "values": {"id": 1, "title": "after exp"}, "mutation_id": 1}))
        .await;
    // Told `unauthorized` (the connection then closes); the write is not applied.
    let error = client.recv_type("error").await;
    assert_eq!(error["code"], "unauthorized", "{error}");
    assert!(client.recv_raw().await.is_none(), "closed");
    let sql = db.connect().await;
    let rows: i64 = sql
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "nothing written after exp");
    bridge.shutdown().await;
    db.drop_db().await;
}

/// Held: `alg: none`, an HS256 token signed with the RS256 public key (algorithm
/// confusion), a token with `exp` as a string, or without `sub`: all unauthorized.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_token_shapes_are_refused() {
    let db = TestDb::create("adv_alg").await;
    let mut config = db.config();
    config.jwt_secret = Some(SECRET.into());
    let bridge = support::start(config).await;
    let b64 = |v: &Value| -> String {
        const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let bytes = v.to_string().into_bytes();
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, b)| acc | (*b as u32) << (16 - 8 * i));
            for i in 0..=chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    };
    let claims = json!({"sub": "eve", "role": APP_ROLE, "exp": now() + 600});
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims)
    );
    let none_upper = format!(
        "{}.{}.",
        b64(&json!({"alg": "NONE", "typ": "JWT"})),
        b64(&claims)
    );
    let hs512 = encode(
        &Header::new(Algorithm::HS512),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap();
    let string_exp = token(json!({"sub": "eve", "exp": (now() + 600).to_string()}));
    let no_sub = token(json!({"role": APP_ROLE, "exp": now() + 600}));
    for (what, t) in [
        ("alg none", none),
        ("alg NONE", none_upper),
        ("HS512", hs512),
        ("exp as a string", string_exp),
        ("no sub", no_sub),
    ] {
        let mut c = WsClient::connect(bridge.addr).await;
        c.send(json!({"type": "hello", "client_id": "eve", "token": t, "protocol": 1}))
            .await;
        let r = c.recv().await;
        eprintln!("{what}: {r}");
        assert_eq!(r["code"], "unauthorized", "{what}: {r}");
        assert!(c.recv_raw().await.is_none(), "closed");
    }
    bridge.shutdown().await;
    db.drop_db().await;
}
