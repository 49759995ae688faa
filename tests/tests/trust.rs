//! Trust between servers, tried as an attacker on the servers' network would: real `enspeed
//! server` processes on loopback, and clients that are not the cluster's servers. Every
//! attempt is refused and changes nothing; the cluster's own servers go on.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use enspeed_tests::cluster::{self, CallError, Client, LogOnPanic, Server};
use enspeed_tests::*;
use enspeed_trust::{ClusterToken, Connector, Enrollment, Identity, TrustDir};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);
const CLIENT: Client = Client {
    connect: Some(Duration::from_secs(5)),
    read: Duration::from_secs(10),
};

fn get(addr: &str, key: &str) -> Value {
    CLIENT
        .call(addr, &json!({"op": "get", "key": key}))
        .unwrap_or_else(|e| panic!("get {key} from {addr}: {e}"))["value"]
        .clone()
}

/// Whether `r` is a refusal (no result), and never a result.
fn refused(what: &str, r: Result<Value, CallError>) -> CallError {
    match r {
        Ok(v) => panic!("{what}: answered {v}"),
        Err(e) => e,
    }
}

#[test]
fn servers_believe_only_servers_of_their_cluster() {
    let scratch = Scratch::new("trust");
    let mut servers: Vec<Server> = (1..=3)
        .map(|id| {
            let mut s = Server::new(
                id,
                format!("127.0.0.1:{}", cluster::free_port()),
                scratch.path(&format!("server{id}")),
                &[],
            );
            s.log_on_panic = LogOnPanic::Last(30);
            s
        })
        .collect();
    cluster::bootstrap(&mut servers, &CLIENT, WAIT);
    cluster::wait_for("three voters", WAIT, || {
        let st = CLIENT.status(&servers[0].addr)?;
        (st["voters"].as_array()?.len() == 3).then_some(())
    });
    let leader = servers[0].addr.clone();
    let token = ClusterToken::parse(&cluster::cluster_token(&servers[0].data)).unwrap();

    // Every server records the certificate it joined with.
    let state = CLIENT
        .call(&leader, &json!({"op": "read", "query": {"query": "state"}}))
        .unwrap();
    for s in &servers {
        let fp = Identity::load(&TrustDir::of(&s.data))
            .unwrap()
            .fingerprint
            .hex();
        assert_eq!(
            state["servers"][s.id.to_string()]["cert"],
            json!(fp),
            "server {}",
            s.id
        );
    }

    // 1. Plain JSON on the cluster port, as before there was TLS: a forged Manager action and
    //    a raw command. The server wants a TLS handshake; nothing it answers is JSON.
    for line in [
        json!({"op": "propose", "command": {"cmd": "put", "key": "stranger", "value": "1"}}),
        json!({"op": "propose", "command": {"cmd": "act", "actor": 1, "at_ms": 0,
               "action": {"action": "create_user", "name": "mallory", "role": "manager",
                          "password_hash": "x", "parent": null, "quota": null}}}),
        json!({"op": "read", "query": {"query": "state"}}),
    ] {
        let mut s = TcpStream::connect(&leader).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        assert!(
            !answer.contains(&b'{'),
            "a plain client got an answer: {:?}",
            String::from_utf8_lossy(&answer)
        );
    }

    // 2. TLS without a certificate (the cluster is found by its CA, as a joining server does):
    //    nothing but enrolling.
    let anonymous = Connector::enrolling(token.ca);
    for req in [
        json!({"op": "put", "key": "stranger", "value": "2"}),
        json!({"op": "propose", "command": {"cmd": "put", "key": "stranger", "value": "3"}}),
        json!({"op": "read", "query": {"query": "state"}}),
        json!({"op": "console", "vm": "any", "console": "serial"}),
        json!({"op": "add_server", "server": {"id": 9, "address": "127.0.0.1:1"}}),
    ] {
        let e = refused(
            "a client without a certificate",
            CLIENT.call_with(&anonymous, &leader, &req),
        );
        assert!(e.to_string().contains("may only enroll"), "{req}: {e}");
    }
    // Enrolling takes the cluster's token, and a free id.
    let wrong = {
        let other = TrustDir::of(&scratch.path("another-cluster"));
        other.create_cluster(1).unwrap();
        other.cluster_token().unwrap()
    };
    let enroll = |id: u64, token: &ClusterToken| {
        CLIENT.call_with(
            &anonymous,
            &leader,
            &json!({"op": "enroll", "id": id, "token": token.to_string()}),
        )
    };
    let forged =
        ClusterToken::parse(&format!("K1.{}.{}", token.ca.hex(), "00".repeat(16))).unwrap();
    let e = refused("a forged token", enroll(9, &forged));
    assert!(
        e.to_string().contains("not this cluster's join token"),
        "{e}"
    );
    let e = refused("another cluster's token", enroll(9, &wrong));
    assert!(
        e.to_string().contains("not this cluster's join token"),
        "{e}"
    );
    let e = refused("a member's id", enroll(2, &token));
    assert!(e.to_string().contains("belongs to the member"), "{e}");
    // A server started with a wrong token stops with the cluster's refusal (retrying could
    // not change it), and is not added.
    let mut wrong_join = Server::new(
        8,
        format!("127.0.0.1:{}", cluster::free_port()),
        scratch.path("server8"),
        &[],
    );
    wrong_join.start(&["--join", &leader, "--token", &forged.to_string()]);
    let st = wrong_join
        .wait_exit(WAIT)
        .expect("the server with a wrong token stops");
    assert!(!st.success(), "{st}");
    let log = wrong_join.log();
    assert!(
        log.contains("enrolling with the cluster at")
            && log.contains("not this cluster's join token"),
        "{log}"
    );

    // 3. Another cluster's server: its certificate does not chain to this cluster's CA.
    let foreign = Identity::load(&TrustDir::of(&scratch.path("another-cluster"))).unwrap();
    let e = refused(
        "another cluster's certificate",
        CLIENT
            .call(&leader, &json!({"op": "status"}))
            .and_then(|_| {
                CLIENT.call_with(&foreign.connector(), &leader, &json!({"op": "status"}))
            }),
    );
    assert!(
        !matches!(e, CallError::Refused(_)),
        "refused at TLS, not by an answer: {e}"
    );

    // 4. A stranger's Raft hello: a certificate of this cluster (enrolled with the token, as an
    //    operator could) whose hello claims to be server 1, the leader.
    let enrolled: Enrollment =
        serde_json::from_value(enroll(9, &token).expect("enrolling server 9")).unwrap();
    let nine = TrustDir::of(&scratch.path("server9"));
    nine.install(&enrolled).unwrap();
    let nine = Identity::load(&nine).unwrap();
    assert_eq!(nine.id, 9);
    let follower = &servers[1];
    let (mut s, _) = nine
        .connector()
        .connect(&follower.addr, Duration::from_secs(5))
        .unwrap();
    let mut hello = b"ENSPRAFT".to_vec();
    hello.extend_from_slice(&1u64.to_be_bytes());
    hello.extend_from_slice(&(leader.len() as u16).to_be_bytes());
    hello.extend_from_slice(leader.as_bytes());
    s.write_all(&hello).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    cluster::wait_for("the follower to refuse the hello", WAIT, || {
        follower
            .log()
            .contains("hello names another server than its certificate")
            .then_some(())
    });

    // 5. A server of the cluster speaks for itself only: server 2 neither heartbeats nor
    //    reports for server 1; its own heartbeat is answered.
    let two = Identity::load(&TrustDir::of(&servers[1].data))
        .unwrap()
        .connector();
    for req in [
        json!({"op": "heartbeat", "server": 1}),
        json!({"op": "propose", "command": {"cmd": "iso_held", "name": "x",
               "sha256": "00".repeat(32), "server": 1}}),
    ] {
        let e = refused(
            "server 2 for server 1",
            CLIENT.call_with(&two, &leader, &req),
        );
        assert!(
            e.to_string().contains("speaks for itself only"),
            "{req}: {e}"
        );
    }
    CLIENT
        .call_with(&two, &leader, &json!({"op": "heartbeat", "server": 2}))
        .expect("server 2's own heartbeat");

    // 6. A removed server's certificate is refused for good, though it still holds it.
    let mut gone = servers.pop().unwrap();
    CLIENT
        .call(&leader, &json!({"op": "remove_server", "id": gone.id}))
        .unwrap();
    let state = cluster::wait_for("server 3's certificate revoked", WAIT, || {
        let st = CLIENT
            .call(&leader, &json!({"op": "read", "query": {"query": "state"}}))
            .ok()?;
        (st["revoked"].as_object()?.len() == 1).then_some(st)
    });
    let gone_identity = Identity::load(&TrustDir::of(&gone.data)).unwrap();
    assert_eq!(
        state["revoked"][gone_identity.fingerprint.hex()],
        json!(gone.id)
    );
    gone.kill9();
    for s in &servers {
        let e = refused(
            "a removed server",
            CLIENT.call_with(
                &gone_identity.connector(),
                &s.addr,
                &json!({"op": "status"}),
            ),
        );
        assert!(!matches!(e, CallError::Refused(_)), "{e}");
        cluster::wait_for("the refusal in the log", WAIT, || {
            s.log()
                .contains("was revoked when it was removed")
                .then_some(())
        });
    }

    // None of it changed anything, and the cluster's own servers go on.
    assert_eq!(get(&leader, "stranger"), Value::Null);
    CLIENT
        .call(
            &servers[1].addr,
            &json!({"op": "put", "key": "after", "value": "ok"}),
        )
        .unwrap();
    assert_eq!(get(&leader, "after"), json!("ok"));
}
