//! The orchestrator's REST API with real processes: three `enspeed server`s on loopback (two
//! run VMs with their agents and blockd, one is a witness), each serving the API. Checked:
//!
//! - an authorization matrix: every operation of the OpenAPI document x Manager, Power User and
//!   Regular User x their own, a subordinate's and a foreign object, each allowed or refused
//!   as the roles say, and a refused change changes nothing;
//! - bad input: malformed JSON, oversized bodies, unknown fields, the wrong content type,
//!   a missing or stale CSRF token, an expired session, too many failed logins: each a clear
//!   error and no change;
//! - requests through a follower see their own writes; the audit log records every change.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use enspeed_tests::cluster::{self, free_port, LogOnPanic, Server};
use enspeed_tests::web::{Answer, Web, WebCluster as Cluster, PASSWORD, USER_PASSWORD};
use enspeed_tests::Scratch;
use serde_json::{json, Value};

/// One cluster at a time: the machine has two cores.
static ONE_CLUSTER: Mutex<()> = Mutex::new(());

const WAIT: Duration = Duration::from_secs(30);

/// What a case expects.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Want {
    /// 2xx.
    Allowed,
    /// 403: the caller sees it but may not do this.
    Forbidden,
    /// 404: the caller may not even see it.
    Hidden,
    /// 409: the caller may, but what it names is over (a task that ended).
    Ended,
}

/// The matrix's findings: every case run, and those that went wrong.
#[derive(Default)]
struct Matrix {
    covered: BTreeSet<(String, String)>,
    failures: Vec<String>,
    cases: usize,
}

impl Matrix {
    /// Runs `method path` as `who` and checks the answer against `want`; `template` is the
    /// OpenAPI path it exercises.
    fn case(
        &mut self,
        who: (&str, &Web),
        method: &str,
        template: &str,
        path: &str,
        body: Option<Value>,
        want: Want,
    ) -> Answer {
        let r = who.1.send(method, path, body);
        self.check(who.0, method, template, path, &r, want);
        r
    }

    /// Opens a console as `who` and checks the outcome like any case: opening is "allowed".
    fn console_case(&mut self, who: (&str, &Web), kind: &str, vm: u64, want: Want) {
        let r = match who.1.console(vm, kind, None) {
            Ok(_) => (200, json!({ "opened": kind })),
            Err((status, e)) => (status, json!({ "error": e })),
        };
        let template = format!("/vms/{{id}}/console/{kind}");
        let path = format!("/api/v1/vms/{vm}/console/{kind}");
        self.check(who.0, "GET", &template, &path, &r, want);
    }

    fn check(
        &mut self,
        who: &str,
        method: &str,
        template: &str,
        path: &str,
        r: &Answer,
        want: Want,
    ) {
        self.cases += 1;
        self.covered
            .insert((method.to_lowercase(), template.to_string()));
        let ok = match want {
            Want::Allowed => (200..300).contains(&r.0),
            Want::Forbidden => r.0 == 403,
            Want::Hidden => r.0 == 404,
            Want::Ended => r.0 == 409,
        };
        let has_error =
            (200..300).contains(&r.0) || r.1["error"].as_str().is_some_and(|e| !e.is_empty());
        if !ok || !has_error {
            self.failures.push(format!(
                "{who} {method} {path}: want {want:?}, got {} {}",
                r.0, r.1
            ));
        }
    }
}

fn id(v: &Answer) -> u64 {
    assert!((200..300).contains(&v.0), "{v:?}");
    v.1["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("an id in {v:?}"))
}

fn ids(v: &Answer) -> BTreeSet<u64> {
    v.1.as_array()
        .unwrap_or_else(|| panic!("a list: {v:?}"))
        .iter()
        .map(|x| x["id"].as_u64().unwrap())
        .collect()
}

fn new_vm(name: &str, owner: u64) -> Value {
    json!({"name": name, "memory_mib": 64, "vcpus": 1, "disk_gib": 1, "owner": owner})
}

fn new_user(name: &str, role: &str) -> Value {
    json!({"name": name, "password": USER_PASSWORD, "role": role})
}

/// The number of audit entries and the VMs and users as the Manager sees them (what people
/// set, not what the agents observe): what a refused change must leave as it was.
fn fingerprint(m: &Web) -> (usize, Value, Value) {
    let audit = m.get("/api/v1/audit?limit=1000").1;
    let vms: Vec<Value> = m
        .get("/api/v1/vms")
        .1
        .as_array()
        .expect("the VM list")
        .iter()
        .map(|v| {
            json!([
                v["id"],
                v["name"],
                v["owner"],
                v["power"],
                v["memory_mib"],
                v["disks"],
                v["primary"]["server"],
                v["backup"]["server"]
            ])
        })
        .collect();
    (
        audit.as_array().map_or(0, Vec::len),
        Value::Array(vms),
        m.get("/api/v1/users").1,
    )
}

#[test]
fn every_endpoint_by_every_role_on_own_subordinate_and_foreign_objects() {
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start("matrix", &[]);
    let base = c.web[1].clone(); // a follower or the leader: any server serves the API
    let m = c.manager(1);
    let quota = json!({"vms": 6, "memory_mib": 1024, "disk_gib": 16});

    // Two companies: Power Users p1 and p2 with their Regular Users.
    let p1 = id(&m.send(
        "POST",
        "/api/v1/users",
        Some(
            json!({"name": "p1", "password": USER_PASSWORD, "role": "power_user", "quota": quota}),
        ),
    ));
    let p2 = id(&m.send(
        "POST",
        "/api/v1/users",
        Some(
            json!({"name": "p2", "password": USER_PASSWORD, "role": "power_user", "quota": quota}),
        ),
    ));
    let wp1 = Web::logged_in(&base, "p1", USER_PASSWORD);
    let wp2 = Web::logged_in(&base, "p2", USER_PASSWORD);
    let r1a = id(&wp1.send("POST", "/api/v1/users", Some(new_user("r1a", "regular"))));
    let r1b = id(&wp1.send("POST", "/api/v1/users", Some(new_user("r1b", "regular"))));
    let r2 = id(&wp2.send("POST", "/api/v1/users", Some(new_user("r2", "regular"))));
    let wr = Web::logged_in(&base, "r1a", USER_PASSWORD);
    let admin = 1u64;

    // Their VMs.
    let vm_m = id(&m.send("POST", "/api/v1/vms", Some(new_vm("vm-m", admin))));
    let vm_p1 = id(&wp1.send("POST", "/api/v1/vms", Some(new_vm("vm-p1", p1))));
    let vm_r1a = id(&wp1.send("POST", "/api/v1/vms", Some(new_vm("vm-r1a", r1a))));
    let vm_r2 = id(&wp2.send("POST", "/api/v1/vms", Some(new_vm("vm-r2", r2))));
    let all_vms: BTreeSet<u64> = [vm_m, vm_p1, vm_r1a, vm_r2].into();

    let mut x = Matrix::default();
    let (mw, pw, rw) = (
        ("manager", &m),
        ("power user p1", &wp1),
        ("regular user r1a", &wr),
    );

    // Lists show exactly what each role may see.
    for (who, want_vms, want_users) in [
        (
            mw,
            all_vms.clone(),
            BTreeSet::from([admin, p1, p2, r1a, r1b, r2]),
        ),
        (
            pw,
            BTreeSet::from([vm_p1, vm_r1a]),
            BTreeSet::from([p1, r1a, r1b]),
        ),
        (rw, BTreeSet::from([vm_r1a]), BTreeSet::from([r1a])),
    ] {
        let v = x.case(who, "GET", "/vms", "/api/v1/vms", None, Want::Allowed);
        assert_eq!(ids(&v), want_vms, "the VMs {} sees", who.0);
        // A page at a time, one or two VMs a page: the same VMs, by VMID, each once, until a
        // page shorter than its limit; `after` alone, a page of the default 100: all of them.
        let in_order = |path: String| -> Vec<u64> {
            let page = who.1.get(&path);
            assert_eq!(page.0, 200, "{path}: {page:?}");
            page.1
                .as_array()
                .unwrap_or_else(|| panic!("{path}: a list: {page:?}"))
                .iter()
                .map(|v| v["id"].as_u64().expect("a VMID"))
                .collect()
        };
        let want: Vec<u64> = want_vms.iter().copied().collect();
        for limit in [1, 2] {
            let mut paged = Vec::new();
            loop {
                let after = paged.last().copied().unwrap_or(0);
                let got = in_order(format!("/api/v1/vms?after={after}&limit={limit}"));
                assert!(got.len() <= limit, "a page of {limit} held {got:?}");
                paged.extend(&got);
                assert!(
                    paged.len() <= want.len(),
                    "pages past the VMs {} sees: {paged:?}",
                    who.0
                );
                if got.len() < limit {
                    break;
                }
            }
            assert_eq!(paged, want, "the VMs {} sees, {limit} a page", who.0);
        }
        assert_eq!(in_order("/api/v1/vms?after=0".into()), want, "{}", who.0);
        let u = x.case(who, "GET", "/users", "/api/v1/users", None, Want::Allowed);
        assert_eq!(ids(&u), want_users, "the users {} sees", who.0);
        let s = x.case(
            who,
            "GET",
            "/summary",
            "/api/v1/summary",
            None,
            Want::Allowed,
        );
        assert_eq!(
            s.1["vms"]["total"],
            want_vms.len(),
            "{}'s summary: {}",
            who.0,
            s.1
        );
        // Its counts are the list's.
        let listed = |key: &str, value: &str| {
            v.1.as_array()
                .unwrap()
                .iter()
                .filter(|vm| vm.pointer(key).and_then(Value::as_str) == Some(value))
                .count()
        };
        for (at, key, value) in [
            ("/vms/running", "/status", "running"),
            ("/vms/stopped", "/status", "stopped"),
            ("/replication/in_sync", "/replication/state", "in-sync"),
            ("/replication/resyncing", "/replication/state", "resyncing"),
            ("/replication/degraded", "/replication/state", "degraded"),
        ] {
            assert_eq!(
                s.1.pointer(at).and_then(Value::as_u64),
                Some(listed(key, value) as u64),
                "{}'s summary {at}: {}",
                who.0,
                s.1
            );
        }
        let me = x.case(
            who,
            "GET",
            "/session",
            "/api/v1/session",
            None,
            Want::Allowed,
        );
        assert!(me.1["csrf_token"].as_str().is_some_and(|t| t.len() == 64));
        let manager = who.0 == "manager";
        let want = if manager {
            Want::Allowed
        } else {
            Want::Forbidden
        };
        x.case(who, "GET", "/servers", "/api/v1/servers", None, want);
        let join = x.case(
            who,
            "GET",
            "/servers/join",
            "/api/v1/servers/join",
            None,
            want,
        );
        if manager {
            let token = join.1["token"].as_str().unwrap_or_default();
            assert!(
                enspeed_trust::ClusterToken::parse(token).is_ok(),
                "the join information's token is the cluster's: {}",
                join.1
            );
            assert!(
                join.1["address"].as_str().is_some_and(|a| a.contains(':')),
                "{}",
                join.1
            );
        }
        x.case(who, "GET", "/audit", "/api/v1/audit", None, want);
        x.case(
            who,
            "GET",
            "/openapi.json",
            "/api/v1/openapi.json",
            None,
            Want::Allowed,
        );
    }

    // Seeing and powering VMs: own, a subordinate's, a foreign one.
    use Want::*;
    let vm_cases = [
        (mw, vm_m, Allowed),
        (mw, vm_r1a, Allowed),
        (mw, vm_r2, Allowed),
        (pw, vm_p1, Allowed),
        (pw, vm_r1a, Allowed),
        (pw, vm_r2, Hidden),
        (pw, vm_m, Hidden),
        (rw, vm_r1a, Allowed),
        (rw, vm_p1, Hidden),
        (rw, vm_r2, Hidden),
    ];
    // Consoles: of running VMs, to those who may operate them.
    for vm in [vm_r1a, vm_r2] {
        let r = m.send(
            "POST",
            &format!("/api/v1/vms/{vm}/power"),
            Some(json!({"action": "on"})),
        );
        assert_eq!(r.0, 202, "{r:?}");
    }
    cluster::wait_for("vm-r1a and vm-r2 running", WAIT, || {
        [vm_r1a, vm_r2]
            .iter()
            .all(|vm| m.get(&format!("/api/v1/vms/{vm}")).1["status"] == "running")
            .then_some(())
    });
    for (who, vm, want) in [
        (mw, vm_r1a, Allowed),
        (mw, vm_r2, Allowed),
        (pw, vm_r1a, Allowed),
        (pw, vm_r2, Hidden),
        (rw, vm_r1a, Allowed),
        (rw, vm_r2, Hidden),
    ] {
        for kind in ["serial", "vnc"] {
            x.console_case(who, kind, vm, want);
        }
    }
    for vm in [vm_r1a, vm_r2] {
        let r = m.send(
            "POST",
            &format!("/api/v1/vms/{vm}/power"),
            Some(json!({"action": "force-off"})),
        );
        assert_eq!(r.0, 202, "{r:?}");
    }
    cluster::wait_for("vm-r1a and vm-r2 stopped", WAIT, || {
        [vm_r1a, vm_r2]
            .iter()
            .all(|vm| m.get(&format!("/api/v1/vms/{vm}")).1["status"] == "stopped")
            .then_some(())
    });

    for (who, vm, want) in vm_cases {
        let before = fingerprint(&m);
        x.case(
            who,
            "GET",
            "/vms/{id}",
            &format!("/api/v1/vms/{vm}"),
            None,
            want,
        );
        let r = x.case(
            who,
            "POST",
            "/vms/{id}/power",
            &format!("/api/v1/vms/{vm}/power"),
            Some(json!({"action": "off"})),
            want,
        );
        if want != Allowed {
            assert_eq!(
                fingerprint(&m),
                before,
                "a refused power change changed nothing: {r:?}"
            );
        }
    }

    // Migrating: the Manager's alone (once the disk's backup is in sync).
    cluster::wait_for("vm-m's disk in sync", WAIT, || {
        (m.get(&format!("/api/v1/vms/{vm_m}")).1["replication"]["state"] == "in-sync").then_some(())
    });
    // Cancelling one too (the Manager's own cancel is refused here: nothing is moving yet).
    for (op, who, vm, want) in [
        ("migrate", mw, vm_m, Allowed),
        ("migrate", pw, vm_p1, Forbidden),
        ("migrate", pw, vm_r2, Hidden),
        ("migrate", rw, vm_r1a, Forbidden),
        ("migrate", rw, vm_r2, Hidden),
        ("migrate/cancel", pw, vm_p1, Forbidden),
        ("migrate/cancel", pw, vm_r2, Hidden),
        ("migrate/cancel", rw, vm_r1a, Forbidden),
        ("migrate/cancel", rw, vm_r2, Hidden),
    ] {
        let before = fingerprint(&m);
        let r = x.case(
            who,
            "POST",
            &format!("/vms/{{id}}/{op}"),
            &format!("/api/v1/vms/{vm}/{op}"),
            Some(json!({})),
            want,
        );
        if want != Allowed {
            assert_eq!(
                fingerprint(&m),
                before,
                "a refused {op} changed nothing: {r:?}"
            );
        }
    }

    // Cloning a powered-off VM: one's own or a subordinate's; the clone is then deleted.
    for (n, (who, vm, want)) in [
        (mw, vm_m, Allowed),
        (pw, vm_p1, Allowed),
        (pw, vm_r2, Hidden),
        (rw, vm_r1a, Forbidden),
        (rw, vm_r2, Hidden),
    ]
    .into_iter()
    .enumerate()
    {
        let before = fingerprint(&m);
        let r = x.case(
            who,
            "POST",
            "/vms/{id}/clone",
            &format!("/api/v1/vms/{vm}/clone"),
            Some(json!({ "name": format!("clone{n}") })),
            want,
        );
        if want == Allowed {
            let copy = id(&r);
            let d = who.1.send("DELETE", &format!("/api/v1/vms/{copy}"), None);
            assert_eq!(d.0, 200, "deleting the clone: {d:?}");
        } else {
            assert_eq!(
                fingerprint(&m),
                before,
                "a refused clone changed nothing: {r:?}"
            );
        }
    }

    // Creating VMs: for oneself, for a subordinate, for a foreigner.
    let create_cases = [
        (mw, r1b, Allowed),
        (pw, p1, Allowed),
        (pw, r1b, Allowed),
        (pw, r2, Hidden),
        (pw, admin, Hidden),
        (rw, r1a, Forbidden),
        (rw, r1b, Forbidden),
    ];
    for (n, (who, owner, want)) in create_cases.into_iter().enumerate() {
        let before = fingerprint(&m);
        let r = x.case(
            who,
            "POST",
            "/vms",
            "/api/v1/vms",
            Some(new_vm(&format!("new{n}"), owner)),
            want,
        );
        if want == Allowed {
            let vm = id(&r);
            assert_eq!(r.1["owner"], owner);
            // Changing a powered-off VM: the same people as deleting it.
            x.case(
                who,
                "PATCH",
                "/vms/{id}",
                &format!("/api/v1/vms/{vm}"),
                Some(json!({"vcpus": 2})),
                Allowed,
            );
            // Deleting: the Manager any, the Power User its company's.
            x.case(
                who,
                "DELETE",
                "/vms/{id}",
                &format!("/api/v1/vms/{vm}"),
                None,
                Allowed,
            );
        } else {
            assert_eq!(
                fingerprint(&m),
                before,
                "a refused create changed nothing: {r:?}"
            );
        }
    }

    // Deleting or changing VMs one may not: a Regular User its own, anyone a foreign one.
    for (who, vm, want) in [
        (rw, vm_r1a, Forbidden),
        (rw, vm_r2, Hidden),
        (pw, vm_r2, Hidden),
        (pw, vm_m, Hidden),
    ] {
        let before = fingerprint(&m);
        let r = x.case(
            who,
            "DELETE",
            "/vms/{id}",
            &format!("/api/v1/vms/{vm}"),
            None,
            want,
        );
        let c = x.case(
            who,
            "PATCH",
            "/vms/{id}",
            &format!("/api/v1/vms/{vm}"),
            Some(json!({"memory_mib": 96})),
            want,
        );
        assert_eq!(
            fingerprint(&m),
            before,
            "a refused delete or change changed nothing: {r:?} {c:?}"
        );
    }

    // Users: seeing, creating, changing and deleting.
    for (who, user, want) in [
        (mw, r2, Allowed),
        (pw, p1, Allowed),
        (pw, r1a, Allowed),
        (pw, r2, Hidden),
        (pw, p2, Hidden),
        (pw, admin, Hidden),
        (rw, r1a, Allowed),
        (rw, r1b, Hidden),
        (rw, p1, Hidden),
    ] {
        x.case(
            who,
            "GET",
            "/users/{id}",
            &format!("/api/v1/users/{user}"),
            None,
            want,
        );
    }
    for (n, (who, role, want)) in [
        (mw, "power_user", Allowed),
        (mw, "manager", Allowed),
        (pw, "regular", Allowed),
        (pw, "power_user", Forbidden),
        (pw, "manager", Forbidden),
        (rw, "regular", Forbidden),
    ]
    .into_iter()
    .enumerate()
    {
        let before = fingerprint(&m);
        let r = x.case(
            who,
            "POST",
            "/users",
            "/api/v1/users",
            Some(new_user(&format!("t{n}"), role)),
            want,
        );
        if want == Allowed {
            let u = id(&r);
            x.case(
                who,
                "DELETE",
                "/users/{id}",
                &format!("/api/v1/users/{u}"),
                None,
                Allowed,
            );
        } else {
            assert_eq!(
                fingerprint(&m),
                before,
                "a refused user create changed nothing: {r:?}"
            );
        }
    }
    // Throwaway users to change and delete: one in each company.
    let t1 = id(&wp1.send("POST", "/api/v1/users", Some(new_user("tmp1", "regular"))));
    let t2 = id(&wp2.send("POST", "/api/v1/users", Some(new_user("tmp2", "regular"))));
    // One's own password changes only with the current one; another's without it.
    let own = |body: Value| wr.send("PATCH", &format!("/api/v1/users/{r1a}"), Some(body));
    let before = fingerprint(&m);
    let r = own(json!({"password": "another-secret-9"}));
    assert_eq!(r.0, 400, "no current password: {r:?}");
    let r = own(json!({"password": "another-secret-9", "current_password": "not-it-at-all"}));
    assert_eq!(r.0, 403, "a wrong current password: {r:?}");
    assert_eq!(
        fingerprint(&m),
        before,
        "refused password changes changed nothing"
    );
    let pw_change = json!({"password": "another-secret-9", "current_password": USER_PASSWORD});
    for (who, user, want) in [
        (pw, t1, Allowed),
        (pw, t2, Hidden),
        (pw, admin, Hidden),
        (rw, r1a, Allowed),
        (rw, r1b, Hidden),
        (rw, p1, Hidden),
        (mw, t2, Allowed),
    ] {
        let before = fingerprint(&m);
        let r = x.case(
            who,
            "PATCH",
            "/users/{id}",
            &format!("/api/v1/users/{user}"),
            Some(pw_change.clone()),
            want,
        );
        if want != Allowed {
            assert_eq!(
                fingerprint(&m),
                before,
                "a refused change changed nothing: {r:?}"
            );
        }
    }
    // A user's own password change keeps its session; quotas are the Manager's.
    assert_eq!(
        wr.get("/api/v1/session").0,
        200,
        "r1a's session survived its password change"
    );
    x.case(
        pw,
        "PATCH",
        "/users/{id}",
        &format!("/api/v1/users/{p1}"),
        Some(json!({"quota": {"vms": 99, "memory_mib": 99999, "disk_gib": 999}})),
        Forbidden,
    );
    x.case(
        mw,
        "PATCH",
        "/users/{id}",
        &format!("/api/v1/users/{p2}"),
        Some(json!({"quota": {"vms": 7, "memory_mib": 2048, "disk_gib": 32}})),
        Allowed,
    );
    for (who, user, want) in [
        (rw, r1b, Hidden),
        (rw, r1a, Forbidden),
        (pw, t2, Hidden),
        (pw, p2, Hidden),
        (pw, t1, Allowed),
        (mw, t2, Allowed),
    ] {
        let before = fingerprint(&m);
        let r = x.case(
            who,
            "DELETE",
            "/users/{id}",
            &format!("/api/v1/users/{user}"),
            None,
            want,
        );
        if want != Allowed {
            assert_eq!(
                fingerprint(&m),
                before,
                "a refused delete changed nothing: {r:?}"
            );
        }
    }

    // Logging in and out, for each role; the old session is then gone, its CSRF token too.
    for (name, pass) in [
        ("admin", PASSWORD),
        ("p1", USER_PASSWORD),
        ("r1b", USER_PASSWORD),
    ] {
        let mut w = Web::new(&base);
        let r = w.login(name, pass);
        x.check(name, "POST", "/session", "/api/v1/session", &r, Allowed);
        let out = w.send("DELETE", "/api/v1/session", None);
        x.check(name, "DELETE", "/session", "/api/v1/session", &out, Allowed);
        assert_eq!(w.get("/api/v1/vms").0, 401, "{name}'s session ended");
    }

    // Servers: draining and removing one are the Manager's alone. Server 1 goes; this test's
    // clients talk to server 2.
    for who in [pw, rw] {
        let before = fingerprint(&m);
        x.case(
            who,
            "POST",
            "/servers/{id}/drain",
            "/api/v1/servers/1/drain",
            Some(json!({})),
            Forbidden,
        );
        x.case(
            who,
            "DELETE",
            "/servers/{id}",
            "/api/v1/servers/1",
            None,
            Forbidden,
        );
        assert_eq!(
            fingerprint(&m),
            before,
            "a refused server change changed nothing"
        );
    }
    let early = m.send("DELETE", "/api/v1/servers/1", None);
    assert_eq!(
        early.0, 409,
        "a server holding disk copies is not removed: {early:?}"
    );
    assert!(early.1["error"]
        .as_str()
        .unwrap()
        .contains("drain it first"));
    cluster::wait_for("every disk in sync", WAIT, || {
        let vms = m.get("/api/v1/vms").1;
        vms.as_array()?
            .iter()
            .all(|v| v["replication"]["state"] == "in-sync")
            .then_some(())
    });
    // A live backup: whoever operates the VM, its Regular User too.
    for (who, vm, want) in [
        (pw, vm_r2, Hidden),
        (rw, vm_p1, Hidden),
        (rw, vm_r1a, Allowed),
    ] {
        let before = fingerprint(&m);
        x.case(
            who,
            "POST",
            "/vms/{id}/backup",
            &format!("/api/v1/vms/{vm}/backup"),
            Some(json!({"name": "matrix-bk"})),
            want,
        );
        if want != Allowed {
            assert_eq!(fingerprint(&m), before, "a refused backup changed nothing");
        }
    }
    cluster::wait_for("the backup ends", WAIT, || {
        let t = m.get("/api/v1/tasks").1;
        (t[0]["kind"] == "backup" && t[0]["state"] != "running").then_some(())
    });
    assert_eq!(
        m.send("DELETE", "/api/v1/appliances/matrix-bk", None).0,
        200
    );
    // Backups on a schedule: whoever operates the VM (its last backup was just now: none due).
    let schedule = json!({"schedule": {"every_hours": 24, "keep": 2}});
    for (who, vm, body, want) in [
        (pw, vm_r2, schedule.clone(), Hidden),
        (rw, vm_r1a, schedule.clone(), Allowed),
        (mw, vm_r1a, json!({"schedule": null}), Allowed),
    ] {
        let r = x.case(
            who,
            "POST",
            "/vms/{id}/backup-schedule",
            &format!("/api/v1/vms/{vm}/backup-schedule"),
            Some(body.clone()),
            want,
        );
        if want == Allowed {
            assert_eq!(r.1["backup_schedule"], body["schedule"], "{r:?}");
        }
    }
    x.case(
        mw,
        "POST",
        "/servers/{id}/drain",
        "/api/v1/servers/1/drain",
        Some(json!({})),
        Allowed,
    );
    // Its running VMs move live, the others' disks at once: soon nothing is left there.
    cluster::wait_for("every VM off server 1", WAIT, || {
        let vms = m.get("/api/v1/vms").1;
        vms.as_array()?
            .iter()
            .all(|v| v["primary"]["server"] != 1 && v["backup"]["server"] != 1)
            .then_some(())
    });
    let servers = m.get("/api/v1/servers").1;
    assert_eq!(servers[0]["draining"], true, "{servers}");
    x.case(
        mw,
        "DELETE",
        "/servers/{id}",
        "/api/v1/servers/1",
        None,
        Allowed,
    );
    cluster::wait_for("server 1 gone", WAIT, || {
        let s = m.get("/api/v1/servers").1;
        (s.as_array()?.len() == 2 && s[0]["id"] == 2).then_some(())
    });

    // Adding a server: the Manager's alone. Server 4 waits for a cluster (a witness here).
    let scratch = Scratch::new("matrix-new-server");
    let mut s4 = Server::new(
        4,
        format!("127.0.0.1:{}", free_port()),
        scratch.path("server4"),
        &["--witness"],
    );
    let token = s4.start_awaiting_join();
    let add = json!({"address": s4.addr, "token": token});
    for (who, want) in [(pw, Forbidden), (rw, Forbidden), (mw, Allowed)] {
        let before = fingerprint(&m);
        let r = x.case(
            who,
            "POST",
            "/servers",
            "/api/v1/servers",
            Some(add.clone()),
            want,
        );
        if want == Allowed {
            assert_eq!(r.0, 201, "{r:?}");
            assert_eq!(r.1["id"], 4, "{r:?}");
        } else {
            assert_eq!(
                fingerprint(&m),
                before,
                "a refused addition changed nothing"
            );
        }
    }

    // The ISO library: the Manager's to fill and empty; everyone lists it; a VM's CD-ROM is
    // changed by those who operate the VM.
    let iso = |name: &str| format!("/api/v1/isos/{name}");
    let upload = |w: &Web, name: &str| {
        w.raw(
            "PUT",
            &iso(name),
            Some(("application/octet-stream", format!("the bytes of {name}"))),
            true,
        )
    };
    for (who, want) in [(pw, Forbidden), (rw, Forbidden), (mw, Allowed)] {
        let before = fingerprint(&m);
        let r = upload(who.1, "matrix.iso");
        x.check(who.0, "PUT", "/isos/{name}", &iso("matrix.iso"), &r, want);
        if want != Allowed {
            assert_eq!(fingerprint(&m), before, "a refused upload changed nothing");
        }
    }
    for who in [mw, pw, rw] {
        let l = x.case(who, "GET", "/isos", "/api/v1/isos", None, Allowed);
        assert_eq!(l.1[0]["name"], "matrix.iso", "{l:?}");
        assert_eq!(l.1[0]["size"], "the bytes of matrix.iso".len(), "{l:?}");
    }
    for (who, vm, want) in [
        (mw, vm_r2, Allowed),
        (pw, vm_r1a, Allowed),
        (pw, vm_r2, Hidden),
        (pw, vm_m, Hidden),
        (rw, vm_r1a, Allowed),
        (rw, vm_r2, Hidden),
        (rw, vm_p1, Hidden),
    ] {
        let before = fingerprint(&m);
        x.case(
            who,
            "POST",
            "/vms/{id}/cdrom",
            &format!("/api/v1/vms/{vm}/cdrom"),
            Some(json!({"iso": "matrix.iso"})),
            want,
        );
        if want == Allowed {
            assert_eq!(m.get(&format!("/api/v1/vms/{vm}")).1["cdrom"], "matrix.iso");
        } else {
            assert_eq!(
                fingerprint(&m),
                before,
                "a refused CD-ROM change changed nothing"
            );
        }
    }
    let in_use = m.send("DELETE", &iso("matrix.iso"), None);
    assert_eq!(in_use.0, 409, "an ISO in a CD-ROM drive stays: {in_use:?}");
    for vm in [vm_r1a, vm_r2] {
        let r = m.send(
            "POST",
            &format!("/api/v1/vms/{vm}/cdrom"),
            Some(json!({"iso": null})),
        );
        assert_eq!(r.0, 200, "{r:?}");
    }
    for (who, want) in [(pw, Forbidden), (rw, Forbidden), (mw, Allowed)] {
        x.case(
            who,
            "DELETE",
            "/isos/{name}",
            &iso("matrix.iso"),
            None,
            want,
        );
    }
    assert_eq!(m.get("/api/v1/isos").1, json!([]));

    // The appliance library: the Manager's to fill, change, share, export and empty; the
    // others see what is shared with their company.
    let ovas = Scratch::new("matrix-ova");
    let raw = ovas.path("disk.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let ova = enspeed_tests::ova::one_disk("matrix-app", &raw, "raw", &ovas.path(""), true);
    let app = |tail: &str| format!("/api/v1/appliances/matrix-app{tail}");
    for (who, want) in [(pw, Forbidden), (rw, Forbidden), (mw, Allowed)] {
        let before = fingerprint(&m);
        let r = who.1.put_bytes(&app(""), &ova);
        x.check(who.0, "PUT", "/appliances/{name}", &app(""), &r, want);
        if want != Allowed {
            assert_eq!(fingerprint(&m), before, "a refused import changed nothing");
        }
    }
    let listed = |who: (&str, &Web), x: &mut Matrix| {
        let l = x.case(
            who,
            "GET",
            "/appliances",
            "/api/v1/appliances",
            None,
            Allowed,
        );
        l.1.as_array().map_or(0, Vec::len)
    };
    for (who, n) in [(mw, 1), (pw, 0), (rw, 0)] {
        assert_eq!(listed(who, &mut x), n, "{}: not shared yet", who.0);
    }
    for (who, want) in [(pw, Forbidden), (rw, Forbidden), (mw, Allowed)] {
        x.case(
            who,
            "PATCH",
            "/appliances/{name}",
            &app(""),
            Some(json!({"shared_with": [p1]})),
            want,
        );
    }
    for who in [pw, rw] {
        assert_eq!(
            listed(who, &mut x),
            1,
            "{}: shared with p1's company",
            who.0
        );
    }
    for (who, want) in [(pw, Forbidden), (rw, Forbidden), (mw, Allowed)] {
        let (status, bytes) = who.1.get_bytes(&app("/ova"));
        let body = if status == 200 {
            json!({ "bytes": bytes.len() })
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        x.check(
            who.0,
            "GET",
            "/appliances/{name}/ova",
            &app("/ova"),
            &(status, body),
            want,
        );
    }
    for (who, want) in [(pw, Forbidden), (rw, Forbidden), (mw, Allowed)] {
        x.case(who, "DELETE", "/appliances/{name}", &app(""), None, want);
    }
    assert_eq!(m.get("/api/v1/appliances").1, json!([]));

    // Resumable uploads: a Manager's to open; each is its opener's alone (to the others it is
    // not there).
    let open = |who: (&str, &Web), x: &mut Matrix, want| {
        let body = json!({"kind": "appliance", "name": "matrix-up", "size": ova.len()});
        x.case(who, "POST", "/uploads", "/api/v1/uploads", Some(body), want)
    };
    for who in [pw, rw] {
        open(who, &mut x, Forbidden);
    }
    let id = open(mw, &mut x, Allowed).1["id"]
        .as_str()
        .expect("an upload's id")
        .to_string();
    let upload = format!("/api/v1/uploads/{id}");
    for (who, want) in [(pw, Hidden), (rw, Hidden), (mw, Allowed)] {
        x.case(who, "GET", "/uploads/{id}", &upload, None, want);
    }
    let half = ova.len() / 2;
    for (who, want) in [(pw, Hidden), (rw, Hidden), (mw, Allowed)] {
        let r = who.1.upload_part(&id, 0, &ova[..half]);
        x.check(who.0, "PATCH", "/uploads/{id}", &upload, &r, want);
    }
    for (who, want) in [(pw, Hidden), (rw, Hidden), (mw, Allowed)] {
        x.case(who, "DELETE", "/uploads/{id}", &upload, None, want);
    }
    assert_eq!(m.get(&upload).0, 404, "a deleted upload is gone");

    // Appliance directories and downloads: the Manager's (the file is missing: the task
    // fails, nothing is added).
    let site = enspeed_tests::web::serve_files(|site| {
        let catalogue = json!([{"name": "matrix-dl", "size": 1024, "sha256": "ab".repeat(32),
            "url": format!("{site}/none.ova")}]);
        vec![("/c.json".into(), catalogue.to_string().into_bytes())]
    });
    let directory = format!("/api/v1/appliance-directory?url={site}/c.json");
    for (who, want) in [(pw, Forbidden), (rw, Forbidden), (mw, Allowed)] {
        x.case(who, "GET", "/appliance-directory", &directory, None, want);
    }
    let download = Some(json!({"url": format!("{site}/none.ova")}));
    for (who, want) in [(pw, Forbidden), (rw, Forbidden), (mw, Allowed)] {
        let path = "/api/v1/appliances/matrix-dl/download";
        x.case(
            who,
            "POST",
            "/appliances/{name}/download",
            path,
            download.clone(),
            want,
        );
    }
    cluster::wait_for("the download fails", WAIT, || {
        let t = m.get("/api/v1/tasks").1;
        (t[0]["state"] == "failed").then_some(())
    });
    assert_eq!(m.get("/api/v1/appliances").1, json!([]));

    // Copy back: who administers a powered-off VM makes an appliance of it, a task that who
    // may see the VM sees; a Manager, or who asked, may cancel it (once ended: 409).
    for (who, vm, want) in [
        (rw, vm_r1a, Forbidden),
        (pw, vm_r2, Hidden),
        (pw, vm_r1a, Allowed),
    ] {
        let before = fingerprint(&m);
        x.case(
            who,
            "POST",
            "/vms/{id}/copy-back",
            &format!("/api/v1/vms/{vm}/copy-back"),
            Some(json!({"name": "matrix-back"})),
            want,
        );
        if want != Allowed {
            assert_eq!(
                fingerprint(&m),
                before,
                "a refused copy back changed nothing"
            );
        }
    }
    let task = cluster::wait_for("the copy back ends", WAIT, || {
        let t = m.get("/api/v1/tasks").1;
        (t[0]["state"] != "running").then(|| t[0].clone())
    });
    assert_eq!(task["state"], "done", "{task}");
    // Done means its images are in the library of the server that holds it, already.
    let listed = m.get("/api/v1/appliances").1;
    let made = listed
        .as_array()
        .and_then(|l| l.iter().find(|a| a["name"] == "matrix-back"))
        .unwrap_or_else(|| panic!("the copy back's appliance is listed: {listed}"));
    let holders = made["servers"].as_array().cloned().unwrap_or_default();
    assert!(!holders.is_empty(), "{made}");
    for holder in holders {
        let s = c.servers.iter().find(|s| json!(s.id) == holder).unwrap();
        for d in made["disks"].as_array().unwrap() {
            let sha = d["sha256"].as_str().unwrap();
            let image = s.data.join("isos").join(format!("{sha}.raw"));
            assert!(image.exists(), "{} once the task is done", image.display());
        }
    }
    for who in [mw, pw, rw] {
        let l = x.case(who, "GET", "/tasks", "/api/v1/tasks", None, Allowed);
        assert_eq!(l.1[0]["id"], task["id"], "{}: {l:?}", who.0);
    }
    let cancel = format!("/api/v1/tasks/{}/cancel", task["id"]);
    for (who, want) in [(rw, Forbidden), (pw, Ended), (mw, Ended)] {
        x.case(who, "POST", "/tasks/{id}/cancel", &cancel, None, want);
    }
    let back = m.get("/api/v1/appliances").1;
    assert_eq!(back[0]["name"], "matrix-back", "{back}");
    assert_eq!(
        back[0]["shared_with"],
        json!([p1]),
        "shared with the VM's company"
    );
    assert_eq!(
        m.send("DELETE", "/api/v1/appliances/matrix-back", None).0,
        200
    );

    // Networks: a Manager's to define and delete; everyone lists those they may use.
    for (who, want) in [(pw, Forbidden), (rw, Forbidden), (mw, Allowed)] {
        let before = fingerprint(&m);
        x.case(
            who,
            "POST",
            "/networks",
            "/api/v1/networks",
            Some(json!({"name": "matrix-net", "bridge": "br-matrix"})),
            want,
        );
        if want != Allowed {
            assert_eq!(fingerprint(&m), before, "a refused network changed nothing");
        }
    }
    for who in [mw, pw, rw] {
        let l = x.case(who, "GET", "/networks", "/api/v1/networks", None, Allowed);
        assert_eq!(l.1[0]["name"], "matrix-net", "{l:?}");
    }
    for (who, want) in [(pw, Forbidden), (rw, Forbidden), (mw, Allowed)] {
        x.case(
            who,
            "DELETE",
            "/networks/{name}",
            "/api/v1/networks/matrix-net",
            None,
            want,
        );
    }
    assert_eq!(m.get("/api/v1/networks").1, json!([]));

    // Every operation of the OpenAPI document was exercised.
    let doc = Web::new(&base).get("/api/v1/openapi.json");
    assert_eq!(doc.0, 200, "the OpenAPI document needs no session");
    let mut listed = BTreeSet::new();
    for (path, ops) in doc.1["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            listed.insert((
                method.clone(),
                path.trim_start_matches("/api/v1").to_string(),
            ));
        }
    }
    assert_eq!(
        x.covered, listed,
        "the matrix covers every documented operation"
    );

    // Without a session, every operation but logging in and the document is refused.
    let anon = Web::new(&base);
    for (method, path) in &listed {
        if (method == "post" && path == "/session") || path == "/openapi.json" {
            continue;
        }
        let p = format!(
            "/api/v1{}",
            path.replace("{id}", &vm_r1a.to_string())
                .replace("{name}", "x.iso")
        );
        let r = if let Some(kind) = path.strip_prefix("/vms/{id}/console/") {
            match anon.console(vm_r1a, kind, None) {
                Ok(_) => (101, Value::Null),
                Err((status, e)) => (status, json!({ "error": e })),
            }
        } else {
            anon.send(&method.to_uppercase(), &p, Some(json!({})))
        };
        if r.0 != 401 {
            x.failures.push(format!(
                "anonymous {method} {p}: want 401, got {} {}",
                r.0, r.1
            ));
        }
    }

    // The audit log names who did what.
    let audit = m.get("/api/v1/audit?limit=1000").1;
    let entries = audit.as_array().unwrap();
    assert!(entries
        .iter()
        .any(|e| e["actor_name"] == "p1" && e["action"] == "vm.create"));
    assert!(entries
        .iter()
        .any(|e| e["actor_name"] == "admin" && e["action"] == "user.quota"));
    assert!(entries
        .iter()
        .any(|e| e["actor_name"] == "r1a" && e["action"] == "user.password"));

    eprintln!("authorization matrix: {} cases", x.cases);
    assert!(
        x.failures.is_empty(),
        "{} of {} cases went wrong:\n{}",
        x.failures.len(),
        x.cases,
        x.failures.join("\n")
    );
}

#[test]
fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start(
        "bad",
        &["--session-ttl-secs", "3", "--web-timeout-secs", "3"],
    );
    let m = c.manager(0);
    let vm = id(&m.send("POST", "/api/v1/vms", Some(new_vm("v", 1))));
    let before = fingerprint(&m);
    let expect = |what: &str, r: Answer, status: u16, says: &str| {
        assert_eq!(r.0, status, "{what}: {r:?}");
        let e = r.1["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no error message in {r:?}"));
        assert!(e.contains(says), "{what}: {e:?} should say {says:?}");
    };
    let json_ct = |b: &str| Some(("application/json", b.to_string()));

    for (what, query, says) in [
        ("an empty page asked for", "limit=0", "limit=0: 1 to 1000"),
        ("too long a page", "limit=1001", "limit=1001: 1 to 1000"),
        ("a page after no number", "after=x", "after=\"x\": a number"),
        ("a negative page", "limit=-1", "a number"),
    ] {
        expect(what, m.get(&format!("/api/v1/vms?{query}")), 400, says);
    }

    expect(
        "malformed JSON",
        m.raw("POST", "/api/v1/vms", json_ct("{\"name\": "), true),
        400,
        "JSON",
    );
    expect(
        "not an object",
        m.raw("POST", "/api/v1/vms", json_ct("[1,2]"), true),
        400,
        "JSON",
    );
    expect(
        "an unknown field",
        m.send(
            "POST",
            "/api/v1/vms",
            Some(json!({"name": "x", "memory_mib": 64, "disk_gib": 1, "colour": "red"})),
        ),
        400,
        "unknown field",
    );
    expect(
        "a missing field",
        m.send("POST", "/api/v1/networks", Some(json!({"name": "x"}))),
        400,
        "missing field `bridge`",
    );
    expect(
        "no memory, and no appliance to take it from",
        m.send("POST", "/api/v1/vms", Some(json!({"name": "x"}))),
        400,
        "memory_mib: needed",
    );
    expect(
        "a wrong type",
        m.send(
            "POST",
            "/api/v1/vms",
            Some(json!({"name": "x", "memory_mib": "lots", "disk_gib": 1})),
        ),
        400,
        "invalid type",
    );
    expect(
        "a bad name",
        m.send(
            "POST",
            "/api/v1/vms",
            Some(json!({"name": "../etc", "memory_mib": 64, "disk_gib": 1})),
        ),
        400,
        "name",
    );
    expect(
        "zero memory",
        m.send(
            "POST",
            "/api/v1/vms",
            Some(json!({"name": "x", "memory_mib": 0, "disk_gib": 1})),
        ),
        400,
        "memory_mib",
    );
    expect(
        "a form body",
        m.raw(
            "POST",
            "/api/v1/vms",
            Some(("application/x-www-form-urlencoded", "name=x".into())),
            true,
        ),
        415,
        "application/json",
    );
    let big = format!("{{\"name\": \"{}\"}}", "x".repeat(100_000));
    expect(
        "an oversized body",
        m.raw("POST", "/api/v1/vms", json_ct(&big), true),
        413,
        "over",
    );
    expect("a bad VMID", m.get("/api/v1/vms/abc"), 400, "VMID");
    expect(
        "no such endpoint",
        m.get("/api/v1/nothing"),
        404,
        "no endpoint",
    );
    expect(
        "a wrong method",
        m.send("PUT", "/api/v1/vms", Some(json!({}))),
        405,
        "not allowed",
    );
    expect(
        "a bad power action",
        m.send(
            "POST",
            &format!("/api/v1/vms/{vm}/power"),
            Some(json!({"action": "explode"})),
        ),
        400,
        "unknown variant `explode`, expected one of `on`, `off`, `force-off`",
    );
    expect(
        "no such VM",
        m.send(
            "POST",
            "/api/v1/vms/999/power",
            Some(json!({"action": "on"})),
        ),
        404,
        "no VM 999",
    );
    expect(
        "a weak password",
        m.send(
            "POST",
            "/api/v1/users",
            Some(json!({"name": "u", "password": "short", "role": "regular"})),
        ),
        400,
        "password",
    );

    // CSRF: missing, then stale (the token of an ended session).
    expect(
        "no CSRF token",
        m.raw(
            "POST",
            "/api/v1/users",
            json_ct(&new_user("u1", "regular").to_string()),
            false,
        ),
        403,
        "CSRF",
    );
    let mut other = c.manager(0);
    let stale = other.csrf.clone();
    assert_eq!(other.send("DELETE", "/api/v1/session", None).0, 200);
    assert_eq!(other.login("admin", PASSWORD).0, 200);
    other.csrf = stale;
    expect(
        "a stale CSRF token",
        other.send("POST", "/api/v1/users", Some(new_user("u2", "regular"))),
        403,
        "CSRF",
    );
    assert_eq!(fingerprint(&m).1, before.1, "no VM changed");
    assert_eq!(fingerprint(&m).2, before.2, "no user changed");

    // Failed logins: a clear refusal, then the rate limit, which counts guesses sent at once
    // before their passwords are checked: of 500 sent at once from one address (half for
    // `admin`, half sprayed over other names), five are checked at most; every one is
    // answered, and the server goes on.
    let guesses: Vec<_> = (0..500)
        .map(|i| {
            let url = c.web[0].clone();
            let name = if i % 2 == 0 {
                "admin".to_string()
            } else {
                format!("guess{i}")
            };
            std::thread::spawn(move || Web::new(&url).login(&name, "wrong-password"))
        })
        .collect();
    let answers: Vec<(u16, Value)> = guesses.into_iter().map(|g| g.join().unwrap()).collect();
    let checked = answers.iter().filter(|a| a.0 == 401).count();
    let limited = answers.iter().filter(|a| a.0 == 429).count();
    assert!(
        (1..=5).contains(&checked) && checked + limited == 500,
        "{checked} checked, {limited} limited: {:?}",
        answers.iter().filter(|a| a.0 != 429).collect::<Vec<_>>()
    );
    for a in answers.iter().filter(|a| a.0 == 401) {
        assert!(a.1.to_string().contains("wrong name or password"), "{a:?}");
    }
    let limited = Web::new(&c.web[0]).login("admin", PASSWORD);
    expect("the sixth try", limited, 429, "too many failed logins");
    // Another server keeps its own count: the Manager still gets in there.
    assert_eq!(Web::new(&c.web[1]).login("admin", PASSWORD).0, 200);

    // A client that sends the headers but not the body it announced is answered 408, and one
    // that never finishes its headers is cut off, within the web timeout (3 s here).
    let addr = c.web[0].trim_start_matches("http://").to_string();
    let slow = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let t = std::time::Instant::now();
        let mut body = std::net::TcpStream::connect(&addr).unwrap();
        body.write_all(b"POST /api/v1/session HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"name\"").unwrap();
        let mut headers = std::net::TcpStream::connect(&addr).unwrap();
        headers
            .write_all(b"GET /api/v1/session HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        for s in [&body, &headers] {
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        }
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&answer).contains("did not arrive") {
            match body.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
        let body_after = t.elapsed();
        let cut = headers.read(&mut buf);
        (
            String::from_utf8_lossy(&answer).to_string(),
            body_after,
            cut.map_err(|e| e.kind()),
            t.elapsed(),
        )
    });
    let (answer, body_after, cut, headers_after) = slow.join().unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "a body that never came: {answer:?}"
    );
    assert!(answer.contains("did not arrive within 3 s"), "{answer:?}");
    assert!(
        body_after >= Duration::from_millis(2500) && body_after < Duration::from_secs(15),
        "answered after {body_after:?}"
    );
    assert!(
        matches!(cut, Ok(0) | Err(std::io::ErrorKind::ConnectionReset)),
        "headers that never ended: {cut:?}"
    );
    assert!(
        headers_after < Duration::from_secs(15),
        "cut off after {headers_after:?}"
    );

    // An expired session (the servers here give sessions 3 s).
    let w = c.manager(1);
    assert_eq!(w.get("/api/v1/vms").0, 200);
    std::thread::sleep(Duration::from_millis(3500));
    expect("an expired session", w.get("/api/v1/vms"), 401, "expired");
    expect(
        "a change in an expired session",
        w.send("POST", "/api/v1/vms", Some(new_vm("late", 1))),
        401,
        "expired",
    );
    let m = c.manager(1);
    let after = fingerprint(&m);
    assert_eq!((after.1, after.2), (before.1, before.2), "nothing changed");
}

#[test]
fn a_power_user_s_company_stays_within_its_quota_and_a_regular_user_owns_one_vm() {
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start("quota", &["--shutdown-timeout-secs", "2"]);
    let m = c.manager(2); // through the witness: it serves the API too
    let p = id(&m.send("POST", "/api/v1/users", Some(json!({"name": "p", "password": USER_PASSWORD, "role": "power_user", "quota": {"vms": 2, "memory_mib": 128, "disk_gib": 2}}))));
    // A user keeps at most 16 sessions: sixteen more logins end the oldest, and only it.
    let oldest = Web::logged_in(&c.web[2], "p", USER_PASSWORD);
    let newer: Vec<Web> = (0..16)
        .map(|_| Web::logged_in(&c.web[2], "p", USER_PASSWORD))
        .collect();
    let gone = oldest.get("/api/v1/session");
    assert_eq!(gone.0, 401, "{gone:?}");
    assert!(gone.1.to_string().contains("no such session"), "{gone:?}");
    for w in &newer {
        assert_eq!(w.get("/api/v1/session").0, 200, "the newest sixteen stay");
    }
    let wp = newer.last().unwrap();
    // A user's requests are paced (a burst, then a steady rate per second, per server):
    // flooding one server gets 429 with Retry-After, and slows no other user.
    let flood = id(&wp.send("POST", "/api/v1/users", Some(new_user("flood", "regular"))));
    let fw = Web::logged_in(&c.web[2], "flood", USER_PASSWORD);
    let floods: Vec<_> = (0..8)
        .map(|_| {
            let mut w = Web::new(&c.web[2]);
            (w.cookie, w.csrf) = (fw.cookie.clone(), fw.csrf.clone());
            std::thread::spawn(move || {
                (0..200)
                    .map(|_| w.get("/api/v1/session"))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let other = wp.get("/api/v1/session");
    assert_eq!(other.0, 200, "another user during the flood: {other:?}");
    let answers: Vec<Answer> = floods.into_iter().flat_map(|f| f.join().unwrap()).collect();
    let passed = answers.iter().filter(|a| a.0 == 200).count();
    let paced: Vec<&Answer> = answers.iter().filter(|a| a.0 == 429).collect();
    assert_eq!(
        passed + paced.len(),
        1600,
        "only 200 or 429: {:?}",
        answers.iter().find(|a| a.0 != 200 && a.0 != 429)
    );
    assert!(
        passed >= 400 && !paced.is_empty(),
        "{passed} passed, {} paced",
        paced.len()
    );
    assert!(
        paced[0].1["error"]
            .as_str()
            .unwrap()
            .contains("requests a second"),
        "{:?}",
        paced[0]
    );
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(
        fw.get("/api/v1/session").0,
        200,
        "the pace lets the user in again"
    );
    assert_eq!(
        m.send("DELETE", &format!("/api/v1/users/{flood}"), None).0,
        200
    );
    let r = id(&wp.send("POST", "/api/v1/users", Some(new_user("r", "regular"))));
    let a = wp.send("POST", "/api/v1/vms", Some(new_vm("a", r)));
    assert_eq!(a.0, 201, "{a:?}");
    let again = wp.send("POST", "/api/v1/vms", Some(new_vm("b", r)));
    assert_eq!(again.0, 409, "a Regular User owns one VM: {again:?}");
    assert!(again.1["error"].as_str().unwrap().contains("exactly one"));
    let b = wp.send("POST", "/api/v1/vms", Some(new_vm("b", p)));
    assert_eq!(b.0, 201, "{b:?}");
    let over = wp.send("POST", "/api/v1/vms", Some(new_vm("c", p)));
    assert_eq!(over.0, 409, "the third VM is over the quota: {over:?}");
    assert!(over.1["error"].as_str().unwrap().contains("quota"));
    // The Manager raises the quota; memory now limits.
    let q = m.send(
        "PATCH",
        &format!("/api/v1/users/{p}"),
        Some(json!({"quota": {"vms": 5, "memory_mib": 128, "disk_gib": 9}})),
    );
    assert_eq!(q.0, 200, "{q:?}");
    assert_eq!(q.1["quota"]["used_vms"], 2);
    let over = wp.send("POST", "/api/v1/vms", Some(new_vm("c", p)));
    assert_eq!(over.0, 409, "{over:?}");
    assert!(over.1["error"].as_str().unwrap().contains("memory"));
    // Powering on starts the VM on its primary; status follows.
    let vm = id(&a);
    let wr = Web::logged_in(&c.web[0], "r", USER_PASSWORD);
    assert_eq!(
        wr.send(
            "POST",
            &format!("/api/v1/vms/{vm}/power"),
            Some(json!({"action": "on"}))
        )
        .0,
        202
    );
    cluster::wait_for("the VM running", WAIT, || {
        (wr.get(&format!("/api/v1/vms/{vm}")).1["status"] == "running").then_some(())
    });
    let v = wr.get(&format!("/api/v1/vms/{vm}")).1;
    assert_ne!(v["primary"]["server"], v["backup"]["server"], "{v}");
    let deleting = wp.send("DELETE", &format!("/api/v1/vms/{vm}"), None);
    assert_eq!(deleting.0, 409, "a running VM is not deleted: {deleting:?}");
    // Off: the guest is asked to shut down first (the test guest ignores the power button, so
    // its VMM stops it after the servers' 2 s shutdown timeout); the status goes by "stopping".
    let power = |action: &str| {
        let r = wr.send(
            "POST",
            &format!("/api/v1/vms/{vm}/power"),
            Some(json!({ "action": action })),
        );
        assert_eq!(r.0, 202, "{action}: {r:?}");
    };
    power("off");
    let stopping = wr.get(&format!("/api/v1/vms/{vm}")).1;
    assert_eq!(stopping["power"], "off");
    assert_eq!(stopping["status"], "stopping", "{stopping}");
    cluster::wait_for("the VM stopped after its shutdown timeout", WAIT, || {
        (wr.get(&format!("/api/v1/vms/{vm}")).1["status"] == "stopped").then_some(())
    });
    let primary = v["primary"]["server"].as_u64().unwrap() as usize;
    let agent_log = c.servers[primary - 1].log();
    assert!(
        agent_log.contains("guest asked to shut down"),
        "the agent asked the guest first"
    );
    // Force-off stops it at once.
    power("on");
    cluster::wait_for("the VM running again", WAIT, || {
        (wr.get(&format!("/api/v1/vms/{vm}")).1["status"] == "running").then_some(())
    });
    // Powering on what runs changes nothing, and writes nothing to the audit log: looping it
    // pushes no one's entries out.
    let newest = || m.get("/api/v1/audit?newest=1").1[0]["seq"].clone();
    let before = newest();
    for _ in 0..5 {
        power("on");
    }
    assert_eq!(newest(), before, "no-op power actions are not audited");
    let t = std::time::Instant::now();
    power("force-off");
    cluster::wait_for("the VM stopped", WAIT, || {
        (wr.get(&format!("/api/v1/vms/{vm}")).1["status"] == "stopped").then_some(())
    });
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "force-off took {:?}",
        t.elapsed()
    );
    let audit = m.get("/api/v1/audit?limit=1000").1;
    let all = audit.as_array().unwrap();
    let newest = m.get("/api/v1/audit?newest=3").1;
    assert_eq!(
        newest.as_array().unwrap()[..],
        all[all.len() - 3..],
        "?newest=3 gives the last three entries, oldest first"
    );
    for verb in ["vm.power_on", "vm.power_off", "vm.force_off"] {
        assert!(
            audit
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["action"] == verb && e["actor_name"] == "r"),
            "{verb} by r in the audit log"
        );
    }
    let name = v["name"].as_str().unwrap().to_string();
    let copies = |i: usize| c.servers[i].data.join(format!("disks/{name}-0"));
    assert!(
        copies(0).exists() && copies(1).exists(),
        "both VM servers hold a copy"
    );
    assert_eq!(wp.send("DELETE", &format!("/api/v1/vms/{vm}"), None).0, 200);
    assert_eq!(wr.get(&format!("/api/v1/vms/{vm}")).0, 404);
    // The agents delete the copies of the deleted VM's disk, on both servers.
    cluster::wait_for("both copies deleted", WAIT, || {
        (!copies(0).exists() && !copies(1).exists()).then_some(())
    });
}

#[test]
fn https_with_a_certificate_made_on_first_start_and_kept() {
    let scratch = Scratch::new("webui-https");
    let port = free_port();
    let pw = scratch.path("pw");
    std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
    let args = [
        "--no-agent".to_string(),
        "--https".into(),
        format!("127.0.0.1:{port}"),
        "--manager".into(),
        "admin".into(),
        "--manager-password-file".into(),
        pw.display().to_string(),
        "--forget-manager-password-file".into(),
    ];
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut s = Server::new(
        1,
        format!("127.0.0.1:{}", free_port()),
        scratch.path("server1"),
        &argv,
    );
    s.log_on_panic = LogOnPanic::Last(40);
    s.start(&["--init"]);
    let cert = s.data.join("web/tls/cert.pem");
    let url = format!("https://localhost:{port}/api/v1/session");
    let body = format!("{{\"name\":\"admin\",\"password\":\"{PASSWORD}\"}}");
    // curl checks the certificate against itself: valid for localhost, a real TLS session.
    let login = || {
        let out = std::process::Command::new("curl")
            .args(["-s", "-i", "--cacert"])
            .arg(&cert)
            .args(["-H", "content-type: application/json", "-d", &body, &url])
            .output()
            .expect("run curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let answer = cluster::wait_for("a login over HTTPS", WAIT, || {
        let a = login();
        a.starts_with("HTTP/1.1 200").then_some(a)
    });
    // The cluster holds the Manager: the password's file is gone (the appliance's first start).
    cluster::wait_for("the password file deleted", WAIT, || {
        (!pw.exists()).then_some(())
    });
    let lower = answer.to_lowercase();
    assert!(lower.contains("set-cookie: enspeed_session="), "{answer}");
    assert!(
        lower.contains("; secure"),
        "the cookie is Secure over HTTPS: {answer}"
    );
    assert!(
        lower.contains("httponly") && lower.contains("samesite=strict"),
        "{answer}"
    );
    assert!(lower.contains("strict-transport-security"), "{answer}");
    // Plain HTTP on the HTTPS port gets no answer.
    let plain = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://127.0.0.1:{port}/api/v1/session"),
        ])
        .output()
        .unwrap();
    assert_ne!(String::from_utf8_lossy(&plain.stdout), "200");
    // Restarted (the password's file gone), the server keeps its certificate and its Manager.
    let first = std::fs::read(&cert).unwrap();
    s.kill9();
    s.start(&[]);
    cluster::wait_for("a login over HTTPS after a restart", WAIT, || {
        login().starts_with("HTTP/1.1 200").then_some(())
    });
    assert_eq!(std::fs::read(&cert).unwrap(), first, "the same certificate");
}

#[test]
fn the_enspeed_command_is_a_client_of_the_api() {
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start("cli", &["--shutdown-timeout-secs", "2"]);
    let run = |args: &[&str], user: &str, password: &str| {
        let out = std::process::Command::new(enspeed_tests::enspeed_bin())
            .args(args)
            .env("ENSPEED_URL", &c.web[1])
            .env("ENSPEED_USER", user)
            .env("ENSPEED_PASSWORD", password)
            .env("ENSPEED_NEW_PASSWORD", USER_PASSWORD)
            .output()
            .expect("run enspeed");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let ok = |args: &[&str]| {
        let (good, text) = run(args, "admin", PASSWORD);
        assert!(good, "enspeed {args:?}: {text}");
        text
    };
    let out = ok(&[
        "user",
        "create",
        "acme",
        "--role",
        "power_user",
        "--quota",
        "3,512,8",
    ]);
    assert!(out.contains("acme") && out.contains("0/3 VMs"), "{out}");
    let (good, text) = run(
        &["user", "create", "bob", "--role", "regular"],
        "acme",
        USER_PASSWORD,
    );
    assert!(good, "{text}");
    let out = ok(&[
        "vm", "create", "web1", "--memory", "64", "--disk", "1", "--owner", "3",
    ]);
    assert!(out.contains("web1") && out.contains("bob"), "{out}");
    let list = ok(&["vm", "list"]);
    assert!(list.contains("web1") && list.contains("stopped"), "{list}");
    let json: Value = serde_json::from_str(&ok(&["vm", "list", "--json"])).unwrap();
    let id = json[0]["id"].as_u64().unwrap().to_string();
    // The list read a VM at a time (`--page 1`: three requests, the last one empty) is the
    // same list, in VMID order.
    let out = ok(&["vm", "create", "web2", "--memory", "64", "--disk", "1"]);
    assert!(out.contains("web2"), "{out}");
    let names = |args: &[&str]| -> Vec<(u64, String)> {
        let v: Value = serde_json::from_str(&ok(args)).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|vm| {
                (
                    vm["id"].as_u64().unwrap(),
                    vm["name"].as_str().unwrap().into(),
                )
            })
            .collect()
    };
    let whole = names(&["vm", "list", "--json"]);
    assert_eq!(whole.len(), 2, "{whole:?}");
    assert!(whole[0].0 < whole[1].0, "{whole:?}");
    assert_eq!(names(&["vm", "list", "--json", "--page", "1"]), whole);
    let web2 = whole.iter().find(|(_, n)| n == "web2").unwrap().0;
    ok(&["vm", "delete", &web2.to_string()]);
    // bob sees and starts his VM; acme's quota shows it.
    let (good, text) = run(&["vm", "start", &id], "bob", USER_PASSWORD);
    assert!(good, "{text}");
    cluster::wait_for("web1 running", WAIT, || {
        run(&["vm", "list"], "bob", USER_PASSWORD)
            .1
            .contains("running")
            .then_some(())
    });
    let (good, text) = run(&["vm", "delete", &id], "bob", USER_PASSWORD);
    assert!(
        !good && text.contains("403"),
        "bob may not delete his VM: {text}"
    );
    let (good, text) = run(&["servers"], "bob", USER_PASSWORD);
    assert!(!good && text.contains("Managers only"), "{text}");
    let servers = ok(&["servers"]);
    assert!(
        servers.contains("leader") && servers.contains("witness"),
        "{servers}"
    );
    // The ISO library: the Manager uploads, with progress on stderr; bob uses it.
    let scratch = Scratch::new("cli-iso");
    let file = scratch.path("tools.iso");
    std::fs::write(&file, vec![0x5a; 3 << 20]).unwrap();
    let up = ok(&["iso", "upload", file.to_str().unwrap()]);
    assert!(
        up.contains("100%") && up.contains("\"name\":\"tools.iso\""),
        "{up}"
    );
    let (good, text) = run(
        &[
            "iso",
            "upload",
            file.to_str().unwrap(),
            "--name",
            "mine.iso",
        ],
        "bob",
        USER_PASSWORD,
    );
    assert!(!good && text.contains("403"), "bob uploads nothing: {text}");
    cluster::wait_for("tools.iso on both VM servers", WAIT, || {
        ok(&["iso", "list"]).contains("2/2").then_some(())
    });
    let (good, text) = run(&["vm", "cdrom", &id, "tools.iso"], "bob", USER_PASSWORD);
    assert!(good, "{text}");
    let shown: Value = serde_json::from_str(&ok(&["vm", "show", &id, "--json"])).unwrap();
    assert_eq!(shown["cdrom"], "tools.iso", "{shown}");
    assert!(ok(&["iso", "list"]).contains(&format!("VM {id}")));
    let (good, text) = run(&["iso", "delete", "tools.iso"], "admin", PASSWORD);
    assert!(!good && text.contains("eject it first"), "{text}");
    let (good, text) = run(&["vm", "cdrom", &id], "bob", USER_PASSWORD);
    assert!(good, "{text}");
    ok(&["iso", "delete", "tools.iso"]);
    assert!(!ok(&["iso", "list"]).contains("tools.iso"));

    // The appliance library: the Manager imports an OVA (progress on stderr), changes and
    // exports it; bob imports nothing.
    let disk = scratch.path("disk.raw");
    std::fs::write(&disk, vec![0x33u8; 1 << 20]).unwrap();
    let ova = scratch.path("cli-app.ova");
    let parts = scratch.path("ova");
    std::fs::create_dir_all(&parts).unwrap();
    std::fs::write(
        &ova,
        enspeed_tests::ova::one_disk("cli", &disk, "qcow2", &parts, true),
    )
    .unwrap();
    let up = ok(&["appliance", "import", ova.to_str().unwrap()]);
    assert!(up.contains("100%") && up.contains("cli-app"), "{up}");
    let (good, text) = run(
        &["appliance", "import", ova.to_str().unwrap(), "--name", "x"],
        "bob",
        USER_PASSWORD,
    );
    assert!(!good && text.contains("403"), "bob imports nothing: {text}");
    let edited = ok(&[
        "appliance",
        "edit",
        "cli-app",
        "--memory",
        "64",
        "--description",
        "from the CLI",
    ]);
    assert!(
        edited.contains("cli-app") && edited.contains(" 64 "),
        "{edited}"
    );
    let out = scratch.path("exported.ova");
    ok(&[
        "appliance",
        "export",
        "cli-app",
        "--out",
        out.to_str().unwrap(),
    ]);
    let exported = std::fs::read(&out).unwrap();
    assert_eq!(&exported[..11], b"cli-app.ovf", "the descriptor first");
    // An appliance directory offering that export: listed, downloaded (a task), the same.
    let site = enspeed_tests::web::serve_files(|site| {
        let catalogue = json!([{"name": "cli-dir", "description": "the CLI's export",
            "size": exported.len(), "sha256": "ab".repeat(32), "url": format!("{site}/x.ova")}]);
        vec![
            ("/x.ova".into(), exported.clone()),
            ("/c.json".into(), catalogue.to_string().into_bytes()),
        ]
    });
    let listed = ok(&["appliance", "directory", &format!("{site}/c.json")]);
    assert!(
        listed.contains("cli-dir") && listed.contains("the CLI's export"),
        "{listed}"
    );
    let started = ok(&["appliance", "download", "cli-dir", &format!("{site}/x.ova")]);
    assert!(
        started.contains("downloading appliance cli-dir"),
        "{started}"
    );
    cluster::wait_for("the download done", WAIT, || {
        ok(&["appliance", "list"]).contains("cli-dir").then_some(())
    });
    let (good, text) = run(
        &[
            "appliance",
            "download",
            "cli-bad",
            &format!("{site}/x.ova"),
            "--sha256",
            "zz",
        ],
        "admin",
        PASSWORD,
    );
    assert!(!good && text.contains("SHA-256"), "{text}");
    ok(&["appliance", "delete", "cli-dir"]);
    ok(&["appliance", "delete", "cli-app"]);
    assert!(!ok(&["appliance", "list"]).contains("cli-app"));

    ok(&["vm", "force-stop", &id]);
    cluster::wait_for("web1 stopped", WAIT, || {
        ok(&["vm", "list"]).contains("stopped").then_some(())
    });
    // Copied back, powered off, into an appliance: a task to follow with `enspeed task list`.
    let started = ok(&["appliance", "copy-back", &id, "web1-back"]);
    assert!(started.contains("copying VM"), "{started}");
    cluster::wait_for("the copy back done", WAIT, || {
        ok(&["task", "list"])
            .lines()
            .any(|l| l.contains("copying VM") && l.contains(" done "))
            .then_some(())
    });
    assert!(ok(&["appliance", "list"]).contains("web1-back"));
    ok(&["appliance", "delete", "web1-back"]);
    ok(&["vm", "delete", &id]);
    assert!(!ok(&["vm", "list"]).contains("web1"));
    // Every CLI call logs in and out (two entries each): all of them, not the first 100.
    let audit = ok(&["audit", "--limit", "1000"]);
    for line in [
        "user.create",
        "vm.create",
        "vm.power_on",
        "vm.force_off",
        "vm.delete",
        "appliance.import",
        "appliance.copy_back",
        "appliance.delete",
    ] {
        assert!(audit.contains(line), "{line} in the audit log:\n{audit}");
    }
    let (good, text) = run(&["vm", "list"], "admin", "wrong-password");
    assert!(
        !good && text.contains("401") && text.contains("wrong name or password"),
        "{text}"
    );
}

#[test]
fn a_manager_migrates_a_running_vm_to_its_backup_server() {
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start("migrate", &[]);
    let m = c.manager(0);
    let r = m.send(
        "POST",
        "/api/v1/vms",
        Some(json!({"name": "mover", "memory_mib": 64, "vcpus": 1, "disk_gib": 1, "start": true})),
    );
    let vm = id(&r);
    let path = format!("/api/v1/vms/{vm}");
    let ready = |m: &Web| {
        let v = m.get(&path).1;
        (v["status"] == "running" && v["replication"]["state"] == "in-sync").then_some(v)
    };
    let before = cluster::wait_for(
        "the VM running, its disk in sync",
        Duration::from_secs(120),
        || ready(&m),
    );
    let (from, to) = (
        before["primary"]["server"].as_u64().unwrap(),
        before["backup"]["server"].as_u64().unwrap(),
    );
    let gen = before["replication"]["generation"].as_u64().unwrap();
    // A pause budget out of range is refused with the range; within it, it is the move's.
    let r = m.send(
        "POST",
        &format!("{path}/migrate"),
        Some(json!({"downtime_ms": 0})),
    );
    assert_eq!(r.0, 409, "{r:?}");
    assert!(
        r.1["error"].as_str().unwrap().contains("1 to 10000"),
        "{r:?}"
    );
    let r = m.send(
        "POST",
        &format!("{path}/migrate"),
        Some(json!({"downtime_ms": 100})),
    );
    assert_eq!(r.0, 202, "{r:?}");
    assert_eq!(r.1["server"], to);
    assert_eq!(
        r.1["live"], true,
        "a running VM booted by the kernel moves live: {r:?}"
    );
    let after = cluster::wait_for_explained(
        "the VM running on its old backup, in sync again",
        Duration::from_secs(60),
        || ready(&m).filter(|v| v["primary"]["server"] == to),
        || {
            let logs: Vec<String> = c.servers.iter().map(|s| s.log()).collect();
            format!("VM: {}\n{}", m.get(&path).1, logs.join("\n----\n"))
        },
    );
    assert_eq!(
        after["backup"]["server"], from,
        "the old primary is the backup now"
    );
    assert!(
        after["replication"]["generation"].as_u64().unwrap() > gen,
        "the generation rose"
    );
    let vmm_on = |server: u64| {
        c.servers[server as usize - 1]
            .log()
            .matches("VMM started")
            .count()
    };
    assert!(vmm_on(to) >= 1, "a VMM started on server {to}");
    // Live: its guest went on (no second boot there), and the audit log has the pause.
    let moved = cluster::wait_for_explained(
        "the move's end in the audit log",
        Duration::from_secs(30),
        || {
            let audit = m.get("/api/v1/audit?limit=1000").1;
            audit
                .as_array()?
                .iter()
                .find(|e| e["action"] == "vm.migrated")
                .cloned()
        },
        || {
            let logs: Vec<String> = c.servers.iter().map(|s| s.log()).collect();
            format!(
                "audit: {}\n{}",
                m.get("/api/v1/audit?limit=1000").1,
                logs.join("\n----\n")
            )
        },
    );
    let target = moved["target"].as_str().unwrap();
    eprintln!("audit: {target}");
    assert!(
        target.contains(&format!("runs on server {to}: paused")),
        "{moved}"
    );
    assert!(
        c.servers[from as usize - 1].log().contains("VM moved live"),
        "the source's agent moved it live"
    );
    // Not yet in sync, or asked by someone else: refused, and nothing moves.
    let p = id(&m.send("POST", "/api/v1/users", Some(json!({"name": "pp", "password": USER_PASSWORD, "role": "power_user", "quota": {"vms": 2, "memory_mib": 512, "disk_gib": 4}}))));
    let wp = Web::logged_in(&c.web[0], "pp", USER_PASSWORD);
    let own = id(&wp.send("POST", "/api/v1/vms", Some(new_vm("ppvm", p))));
    let r = wp.send(
        "POST",
        &format!("/api/v1/vms/{own}/migrate"),
        Some(json!({})),
    );
    assert_eq!(r.0, 403, "a Power User does not migrate: {r:?}");
    let r = wp.send(
        "POST",
        &format!("/api/v1/vms/{vm}/migrate"),
        Some(json!({})),
    );
    assert_eq!(r.0, 404, "nor sees the Manager's VM: {r:?}");
}

#[test]
fn a_clone_starts_with_its_source_s_data_on_the_same_primary() {
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start("clone", &["--shutdown-timeout-secs", "2"]);
    let m = c.manager(0);
    let src = id(&m.send(
        "POST",
        "/api/v1/vms",
        Some(json!({"name": "base", "memory_mib": 64, "vcpus": 1, "disk_gib": 1, "start": true})),
    ));
    let path = format!("/api/v1/vms/{src}");
    cluster::wait_for("the source running", WAIT, || {
        (m.get(&path).1["status"] == "running").then_some(())
    });
    let running = m.send(
        "POST",
        &format!("{path}/clone"),
        Some(json!({"name": "copy"})),
    );
    assert_eq!(running.0, 409, "a running VM is not cloned: {running:?}");
    // Let the guest stamp some blocks, then stop it.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        m.send(
            "POST",
            &format!("{path}/power"),
            Some(json!({"action": "force-off"}))
        )
        .0,
        202
    );
    cluster::wait_for("the source stopped", WAIT, || {
        (m.get(&path).1["status"] == "stopped").then_some(())
    });
    let r = m.send(
        "POST",
        &format!("{path}/clone"),
        Some(json!({"name": "copy"})),
    );
    assert_eq!(r.0, 201, "{r:?}");
    let copy = r.1.clone();
    let source = m.get(&path).1;
    assert_eq!(
        copy["primary"]["server"], source["primary"]["server"],
        "the copy is local"
    );
    assert_ne!(copy["backup"]["server"], copy["primary"]["server"]);
    assert_eq!(
        (copy["memory_mib"].clone(), copy["disks"].clone()),
        (source["memory_mib"].clone(), source["disks"].clone())
    );
    let primary = source["primary"]["server"].as_u64().unwrap() as usize;
    let disks = c.servers[primary - 1].data.join("disks");
    let (a, b) = (disks.join("base-0/data"), disks.join("copy-0/data"));
    cluster::wait_for("the clone's copy made", WAIT, || b.exists().then_some(()));
    assert!(
        enspeed_tests::read_head(&a, 1 << 20)
            .unwrap()
            .iter()
            .any(|&x| x != 0),
        "the source guest wrote its disk"
    );
    let same = |x: &std::path::Path, y: &std::path::Path| {
        enspeed_tests::same_contents(x, y).unwrap_or(false)
    };
    assert!(same(&a, &b), "the clone holds the source's data");
    // Its backup is filled by the ordinary full sync, and it boots.
    let cpath = format!("/api/v1/vms/{}", copy["id"]);
    cluster::wait_for("the clone in sync", Duration::from_secs(120), || {
        (m.get(&cpath).1["replication"]["state"] == "in-sync").then_some(())
    });
    let backup = copy["backup"]["server"].as_u64().unwrap() as usize;
    let mirror = c.servers[backup - 1].data.join("disks/copy-0/data");
    assert!(same(&mirror, &a), "the clone's backup holds the same data");
    assert_eq!(
        m.send(
            "POST",
            &format!("{cpath}/power"),
            Some(json!({"action": "on"}))
        )
        .0,
        202
    );
    cluster::wait_for("the clone running", WAIT, || {
        (m.get(&cpath).1["status"] == "running").then_some(())
    });
}

#[test]
fn a_vm_s_serial_and_graphical_consoles_open_from_any_server_for_its_users_alone() {
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start(
        "console",
        &[
            "--guest-cmdline",
            "console=ttyS0 tg.run=echo tg.echoms=600000",
        ],
    );
    let m = c.manager(0);
    id(&m.send(
        "POST",
        "/api/v1/users",
        Some(
            json!({"name": "p", "password": USER_PASSWORD, "role": "power_user",
            "quota": {"vms": 2, "memory_mib": 256, "disk_gib": 4}}),
        ),
    ));
    let wp = Web::logged_in(&c.web[0], "p", USER_PASSWORD);
    let r = id(&wp.send("POST", "/api/v1/users", Some(new_user("r", "regular"))));
    let other = id(&wp.send("POST", "/api/v1/users", Some(new_user("o", "regular"))));
    let vm = id(&wp.send("POST", "/api/v1/vms", Some(new_vm("con", r))));
    let off = id(&wp.send("POST", "/api/v1/vms", Some(new_vm("off", other))));
    let on = wp.send(
        "POST",
        &format!("/api/v1/vms/{vm}/power"),
        Some(json!({"action": "on"})),
    );
    assert_eq!(on.0, 202, "{on:?}");
    cluster::wait_for("the VM running", WAIT, || {
        (m.get(&format!("/api/v1/vms/{vm}")).1["status"] == "running").then_some(())
    });
    let primary = m.get(&format!("/api/v1/vms/{vm}")).1["primary"]["server"]
        .as_u64()
        .unwrap();

    // Its Regular User, through every server (the witness too): the history first, then
    // keystrokes reach the guest, which echoes them.
    for (i, web) in c.web.iter().enumerate() {
        let wr = Web::logged_in(web, "r", USER_PASSWORD);
        let mut con = wr
            .console(vm, "serial", None)
            .unwrap_or_else(|e| panic!("console through server {}: {e:?}", i + 1));
        let history = con.read_until("tg: echo ready", WAIT);
        assert!(history.contains("tg: entry"), "{history}");
        let line = format!("hello from server {}", i + 1);
        con.send(format!("{line}\r").as_bytes());
        con.read_until(&format!("tg: echo {line}"), WAIT);
        eprintln!(
            "serial console of VM {vm} (on server {primary}) through server {}: echoed",
            i + 1
        );
    }
    // Its Power User too; the Manager too.
    let mut con = wp
        .console(vm, "serial", None)
        .expect("the Power User's console");
    con.read_until("tg: echo ready", WAIT);
    let mut con = m
        .console(vm, "serial", None)
        .expect("the Manager's console");
    con.read_until("tg: echo ready", WAIT);

    // A user keeps at most 8 consoles open through one server; closing one frees its place.
    // (The Power User, through server 2, where it has none open.)
    let wp2 = Web::logged_in(&c.web[1], "p", USER_PASSWORD);
    let mut open: Vec<_> = (0..8)
        .map(|i| {
            wp2.console(vm, "serial", None)
                .unwrap_or_else(|e| panic!("console {i}: {e:?}"))
        })
        .collect();
    let e = wp2
        .console(vm, "serial", None)
        .err()
        .expect("a ninth console refused");
    assert_eq!(e.0, 429, "{e:?}");
    assert!(e.1.contains("consoles open already"), "{e:?}");
    // Another user is not held back by it.
    let mut other = m
        .console(vm, "serial", None)
        .expect("the Manager's second console");
    other.read_until("tg: echo ready", WAIT);
    drop(other);
    // A closed console gives its place back as its relay ends.
    drop(open.pop());
    cluster::wait_for("a console's place given back", WAIT, || {
        wp2.console(vm, "serial", None).ok()
    });
    drop(open);

    // Refusals, each with its reason and before any upgrade.
    let wo = Web::logged_in(&c.web[1], "o", USER_PASSWORD);
    let e = wo.console(vm, "serial", None).err().expect("refused");
    assert_eq!(e.0, 404, "another user's VM is hidden: {e:?}");
    let e = wo.console(off, "serial", None).err().expect("refused");
    assert_eq!(e.0, 409, "a VM that is off: {e:?}");
    assert!(e.1.contains("is off"), "{e:?}");
    let wr = Web::logged_in(&c.web[1], "r", USER_PASSWORD);
    let e = wr
        .console(vm, "serial", Some("http://evil.example"))
        .err()
        .expect("refused");
    assert_eq!(e.0, 403, "a page of another site: {e:?}");
    let e = Web::new(&c.web[1])
        .console(vm, "serial", None)
        .err()
        .expect("refused");
    assert_eq!(e.0, 401, "no session: {e:?}");
    let e = wr.console(vm, "spice", None).err().expect("refused");
    assert_eq!(e.0, 404, "no such console: {e:?}");
    let plain = wr.get(&format!("/api/v1/vms/{vm}/console/serial"));
    assert_eq!(plain.0, 426, "a console is a WebSocket: {plain:?}");

    // `enspeed vm console` is the same console in a terminal (here a pipe).
    {
        use std::io::{Read, Write};
        let mut cli = std::process::Command::new(enspeed_tests::enspeed_bin())
            .args(["vm", "console", &vm.to_string()])
            .env("ENSPEED_URL", &c.web[2])
            .env("ENSPEED_USER", "r")
            .env("ENSPEED_PASSWORD", USER_PASSWORD)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run enspeed vm console");
        let mut stdin = cli.stdin.take().unwrap();
        stdin.write_all(b"typed in a terminal\r").unwrap();
        let mut stdout = cli.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            let _ = stdout.read_to_end(&mut all);
            String::from_utf8_lossy(&all).into_owned()
        });
        std::thread::sleep(Duration::from_secs(1));
        drop(stdin);
        let status = cli.wait().unwrap();
        let text = reader.join().unwrap();
        assert!(status.success(), "{status}: {text}");
        assert!(text.contains("tg: echo typed in a terminal"), "{text}");
    }

    // The graphical console through a server other than the VM's: RFB from its first byte.
    let other_server = c
        .web
        .iter()
        .enumerate()
        .find(|(i, _)| *i as u64 + 1 != primary)
        .map(|(_, w)| w)
        .unwrap();
    let mut vnc = Web::logged_in(other_server, "r", USER_PASSWORD)
        .console(vm, "vnc", None)
        .expect("the graphical console");
    vnc.read_until("RFB 003.008\n", WAIT);
    let e = wo.console(vm, "vnc", None).err().expect("refused");
    assert_eq!(e.0, 404, "another user's VM is hidden: {e:?}");

    // Each opening is in the audit log: who, which VM, which console.
    let audit = m.get("/api/v1/audit?limit=1000").1;
    let opened: Vec<(String, String)> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "vm.console")
        .map(|e| {
            (
                e["actor_name"].as_str().unwrap().to_string(),
                e["target"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (who, target) in [
        ("r", format!("vm {vm} (con): serial")),
        ("p", format!("vm {vm} (con): serial")),
        ("admin", format!("vm {vm} (con): serial")),
        ("r", format!("vm {vm} (con): vnc")),
    ] {
        assert!(
            opened.iter().any(|(a, t)| a == who && *t == target),
            "{who} opening {target} audited: {opened:?}"
        );
    }
    assert!(
        !opened.iter().any(|(a, _)| a == "o"),
        "refused openings are not: {opened:?}"
    );

    // The guest's "bye" ends its echo loop; the console stays open for output.
    let mut con = wr.console(vm, "serial", None).expect("console");
    con.read_until("tg: echo ready", WAIT);
    con.send(b"bye\r");
    con.read_until("tg: echo bye", WAIT);
}

/// The VMM's own view of VM `name`'s CD-ROM (its drive after one disk) on `server`.
fn vmm_cdrom(server: &Server, name: &str) -> Option<Value> {
    use std::io::{BufRead, Write};
    let socket = server.data.join("agent/vms").join(name).join("api.sock");
    let mut s = std::os::unix::net::UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"{\"cmd\":\"status\"}\n").ok()?;
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).ok()?;
    let v: Value = serde_json::from_str(&line).ok()?;
    let d = &v["status"]["disks"][1];
    (d["readonly"] == true).then(|| d["path"].clone())
}

#[test]
fn an_iso_uploaded_to_one_server_reaches_every_vm_server_and_the_cd_rom_of_a_running_vm() {
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start("library", &[]);
    // Through the witness: it takes the upload, the VM servers copy it from there.
    let m = c.manager(2);
    let content: String = (0..3 << 20)
        .map(|i: u32| char::from(b'a' + (i.wrapping_mul(2_654_435_761) >> 27) as u8 % 26))
        .collect();
    let up = m.raw(
        "PUT",
        "/api/v1/isos/install.iso",
        Some(("application/octet-stream", content.clone())),
        true,
    );
    assert_eq!(up.0, 201, "{up:?}");
    let sha = up.1["sha256"].as_str().unwrap().to_string();
    let scratch = Scratch::new("library-check");
    let local = scratch.path("install.iso");
    std::fs::write(&local, &content).unwrap();
    let out = std::process::Command::new("sha256sum")
        .arg(&local)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&sha));
    let again = m.raw(
        "PUT",
        "/api/v1/isos/install.iso",
        Some(("application/octet-stream", "x".into())),
        true,
    );
    assert_eq!(again.0, 409, "{again:?}");
    let cut = m.raw(
        "PUT",
        "/api/v1/isos/empty.iso",
        Some(("application/octet-stream", String::new())),
        true,
    );
    assert_eq!(cut.0, 400, "{cut:?}");

    cluster::wait_for("both VM servers hold the ISO", WAIT, || {
        let l = m.get("/api/v1/isos").1;
        (l[0]["servers"] == json!([1, 2]) && l[0]["vm_servers"] == 2).then_some(())
    });
    for s in &c.servers {
        let copy = s.data.join("isos").join(format!("{sha}.iso"));
        assert_eq!(
            std::fs::read(&copy).unwrap_or_default(),
            content.as_bytes(),
            "server {}'s copy {}",
            s.id,
            copy.display()
        );
    }

    // A running VM's CD-ROM: inserted, ejected, inserted; its VMM has what the state says.
    let vm = id(&m.send(
        "POST",
        "/api/v1/vms",
        Some(json!({"name": "inst", "memory_mib": 64, "disk_gib": 1, "start": true})),
    ));
    cluster::wait_for("the VM running", WAIT, || {
        (m.get(&format!("/api/v1/vms/{vm}")).1["status"] == "running").then_some(())
    });
    let primary = |m: &Web| {
        let v = m.get(&format!("/api/v1/vms/{vm}")).1;
        v["primary"]["server"].as_u64().unwrap() as usize - 1
    };
    let on = primary(&m);
    assert_eq!(
        vmm_cdrom(&c.servers[on], "inst"),
        Some(Value::Null),
        "the drive starts empty"
    );
    let cdrom = |iso: Value| {
        let r = m.send(
            "POST",
            &format!("/api/v1/vms/{vm}/cdrom"),
            Some(json!({ "iso": iso })),
        );
        assert_eq!(r.0, 200, "{r:?}");
    };
    let iso_path = |s: &Server| json!(s.data.join("isos").join(format!("{sha}.iso")));
    cdrom(json!("install.iso"));
    cluster::wait_for("the ISO in the VMM's drive", WAIT, || {
        (vmm_cdrom(&c.servers[on], "inst") == Some(iso_path(&c.servers[on]))).then_some(())
    });
    cdrom(Value::Null);
    cluster::wait_for("the drive empty", WAIT, || {
        (vmm_cdrom(&c.servers[on], "inst") == Some(Value::Null)).then_some(())
    });
    let r = m.send(
        "POST",
        &format!("/api/v1/vms/{vm}/cdrom"),
        Some(json!({"iso": "nothing.iso"})),
    );
    assert_eq!(r.0, 404, "{r:?}");
    cdrom(json!("install.iso"));
    cluster::wait_for("the ISO in the VMM's drive again", WAIT, || {
        (vmm_cdrom(&c.servers[on], "inst") == Some(iso_path(&c.servers[on]))).then_some(())
    });

    // Moved to its backup, the VM finds its CD-ROM there.
    cluster::wait_for("the disk in sync", WAIT, || {
        (m.get(&format!("/api/v1/vms/{vm}")).1["replication"]["state"] == "in-sync").then_some(())
    });
    let r = m.send(
        "POST",
        &format!("/api/v1/vms/{vm}/migrate"),
        Some(json!({})),
    );
    assert_eq!(r.0, 202, "{r:?}");
    cluster::wait_for("the VM running on its old backup", WAIT, || {
        let v = m.get(&format!("/api/v1/vms/{vm}")).1;
        (v["status"] == "running" && primary(&m) != on).then_some(())
    });
    let moved = primary(&m);
    cluster::wait_for("the ISO in the new VMM's drive", WAIT, || {
        (vmm_cdrom(&c.servers[moved], "inst") == Some(iso_path(&c.servers[moved]))).then_some(())
    });

    // Deleted once ejected; every server deletes its copy.
    let r = m.send("DELETE", "/api/v1/isos/install.iso", None);
    assert_eq!(r.0, 409, "in a drive: {r:?}");
    cdrom(Value::Null);
    let r = m.send("DELETE", "/api/v1/isos/install.iso", None);
    assert_eq!(r.0, 200, "{r:?}");
    cluster::wait_for("every server's copy deleted", WAIT, || {
        c.servers
            .iter()
            .all(|s| !s.data.join("isos").join(format!("{sha}.iso")).exists())
            .then_some(())
    });
    let audit = m.get("/api/v1/audit?limit=1000").1;
    for want in ["iso.add", "vm.cdrom_insert", "vm.cdrom_eject", "iso.delete"] {
        assert!(
            audit
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["action"] == want),
            "{want} audited"
        );
    }
}

#[test]
fn a_blank_vm_boots_the_iso_in_its_cd_rom_through_its_bios() {
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start("blank", &[]);
    let m = c.manager(0);
    // The boot disk's program as an El Torito CD: it says where it booted from, checks the
    // ACPI tables and powers the VM off.
    let iso = std::fs::read(enspeed_tests::bootdisk_iso()).unwrap();
    let up = m.put_bytes("/api/v1/isos/bootdisk.iso", &iso);
    assert_eq!(up.0, 201, "{up:?}");
    cluster::wait_for("both VM servers hold the ISO", WAIT, || {
        let l = m.get("/api/v1/isos").1;
        (l[0]["servers"] == json!([1, 2])).then_some(())
    });
    let bad = m.send(
        "POST",
        "/api/v1/vms",
        Some(json!({"name": "b0", "memory_mib": 128, "disk_gib": 1, "boot": "bios", "iso": "none.iso"})),
    );
    assert_eq!(bad.0, 404, "{bad:?}");
    let bad = m.send(
        "POST",
        "/api/v1/vms",
        Some(json!({"name": "b0", "memory_mib": 128, "disk_gib": 1, "boot": "coreboot"})),
    );
    assert_eq!(bad.0, 400, "{bad:?}");
    let r = m.send(
        "POST",
        "/api/v1/vms",
        Some(
            json!({"name": "blank", "memory_mib": 128, "disk_gib": 1, "extra_disks_gib": [1],
                    "boot": "bios", "iso": "bootdisk.iso", "start": true}),
        ),
    );
    assert_eq!(r.0, 201, "{r:?}");
    assert_eq!(
        r.1["disks"],
        json!([1u64 << 30, 1u64 << 30]),
        "Disk0 and Disk1: {r:?}"
    );
    assert_eq!(r.1["boot"], "bios");
    assert_eq!(r.1["boot_order"], "disk_first");
    assert_eq!(r.1["cdrom"], "bootdisk.iso");
    let vm = id(&r);
    // Its blank disk falls through to the CD; the program runs and powers the VM off, which
    // the cluster then shows as stopped.
    let primary = m.get(&format!("/api/v1/vms/{vm}")).1["primary"]["server"]
        .as_u64()
        .unwrap() as usize
        - 1;
    let serial = c.servers[primary].data.join("agent/vms/blank/serial.log");
    cluster::wait_for("the CD booted and powered the VM off", WAIT, || {
        let log = std::fs::read_to_string(&serial).unwrap_or_default();
        (log.contains("bootdisk: loaded whole from a CD (El Torito)")
            && log.contains("S5 sleep type 5; powering off"))
        .then_some(())
    });
    cluster::wait_for("the VM stopped", WAIT, || {
        let v = m.get(&format!("/api/v1/vms/{vm}")).1;
        (v["status"] == "stopped").then_some(())
    });
    let log = std::fs::read_to_string(&serial).unwrap();
    let blank_disks = |log: &str| log.matches("Boot failed: not a bootable disk").count();
    assert_eq!(blank_disks(&log), 1, "the blank disks came first:\n{log}");
    assert!(
        log.contains("bootdisk: hard disks 02"),
        "the BIOS found Disk0 and Disk1:\n{log}"
    );
    assert!(!log.contains("bootdisk: FAIL"), "{log}");

    // Powered off, it can be changed: more memory, the CD first. What does not fit is refused.
    let edit = |body: Value| m.send("PATCH", &format!("/api/v1/vms/{vm}"), Some(body));
    let r = edit(json!({"memory_mib": 256, "boot_order": "cdrom_first"}));
    assert_eq!(r.0, 200, "{r:?}");
    assert_eq!(
        (r.1["memory_mib"].clone(), r.1["boot_order"].clone()),
        (json!(256), json!("cdrom_first"))
    );
    for (body, want) in [
        (json!({"memory_mib": 256}), 409),          // nothing changes
        (json!({"memory_mib": 8}), 409),            // too little
        (json!({"boot": "kernel"}), 409),           // made blank: no guest kernel
        (json!({"memory": 256}), 400),              // unknown field
        (json!({"add_disks_gib": [0]}), 400),       // a disk of no size
        (json!({"add_disks_gib": [1, 1, 1]}), 409), // past Disk3
    ] {
        let r = edit(body.clone());
        assert_eq!(r.0, want, "{body}: {r:?}");
    }
    let audit = m.get("/api/v1/audit").1.to_string();
    assert!(
        audit.contains("vm.edit") && audit.contains("256 MiB"),
        "{audit}"
    );
    // Its next boot goes to the CD at once: the blank disk is not tried again.
    // Powers the VM on and waits for its program's `n`th power-off; answers the serial log.
    let boot = |n: usize, what: &str| {
        let r = m.send(
            "POST",
            &format!("/api/v1/vms/{vm}/power"),
            Some(json!({"action": "on"})),
        );
        assert_eq!(r.0, 202, "{r:?}");
        cluster::wait_for(what, WAIT, || {
            let log = std::fs::read_to_string(&serial).unwrap_or_default();
            (log.matches("S5 sleep type 5; powering off").count() == n).then_some(())
        });
        std::fs::read_to_string(&serial).unwrap()
    };
    let log = boot(2, "the second boot, from the CD first");
    assert_eq!(blank_disks(&log), 1, "{log}");
    cluster::wait_for("the VM stopped again", WAIT, || {
        let v = m.get(&format!("/api/v1/vms/{vm}")).1;
        (v["status"] == "stopped").then_some(())
    });

    // A third disk, and the disks first again: the BIOS now finds three blank disks, mirrored
    // like the others, and boots the CD after them.
    let r = edit(json!({"add_disks_gib": [1], "boot_order": "disk_first"}));
    assert_eq!(r.0, 200, "{r:?}");
    assert_eq!(r.1["disks"].as_array().map(Vec::len), Some(3), "{r:?}");
    let log = boot(3, "the third boot, with three disks");
    assert_eq!(blank_disks(&log), 2, "{log}");
    assert!(log.contains("bootdisk: hard disks 03"), "{log}");
    let audit = m.get("/api/v1/audit").1.to_string();
    assert!(audit.contains("disks added: 1 GiB"), "{audit}");

    // Disk1 grown: both its copies grow (each server's agent asks its blockd), and the VM
    // boots on it. What is not a growth is refused and changes nothing.
    cluster::wait_for("the VM stopped a third time", WAIT, || {
        let v = m.get(&format!("/api/v1/vms/{vm}")).1;
        (v["status"] == "stopped").then_some(())
    });
    for (body, want) in [
        (json!({"grow_disks": [{"disk": 1, "gib": 1}]}), 409), // the size it has
        (json!({"grow_disks": [{"disk": 3, "gib": 2}]}), 409), // no Disk3
        (json!({"grow_disks": [{"disk": 1}]}), 400),           // to what size?
        (json!({"grow_disks": [{"disk": 1, "gib": 0}]}), 400), // no size
    ] {
        let r = edit(body.clone());
        assert_eq!(r.0, want, "{body}: {r:?}");
    }
    let r = edit(json!({"grow_disks": [{"disk": 1, "gib": 3}]}));
    assert_eq!(r.0, 200, "{r:?}");
    assert_eq!(r.1["disks"][1], json!(3u64 << 30), "{r:?}");
    let v = m.get(&format!("/api/v1/vms/{vm}")).1;
    let copy_of_disk1 = |at: &str| {
        let server = v[at]["server"].as_u64().unwrap() as usize - 1;
        c.servers[server].data.join("disks/blank-1/data")
    };
    for at in ["primary", "backup"] {
        let data = copy_of_disk1(at);
        cluster::wait_for(&format!("the {at} copy of Disk1 grown"), WAIT, || {
            (std::fs::metadata(&data).map(|m| m.len()).unwrap_or(0) == 3 << 30).then_some(())
        });
    }
    let log = boot(4, "the fourth boot, Disk1 grown");
    assert!(log.contains("bootdisk: hard disks 03"), "{log}");
    let audit = m.get("/api/v1/audit").1.to_string();
    assert!(audit.contains("Disk1 grown to 3 GiB"), "{audit}");

    // Its disks onto the SATA controller: the BIOS finds the three of them there, each served
    // from its LiveSync copies through the VMM's own vhost-user ring.
    cluster::wait_for("the VM stopped a fourth time", WAIT, || {
        let v = m.get(&format!("/api/v1/vms/{vm}")).1;
        (v["status"] == "stopped").then_some(())
    });
    let threes = log.matches("bootdisk: hard disks 03").count();
    let r = edit(json!({"disk_bus": "sata"}));
    assert_eq!(r.0, 200, "{r:?}");
    assert_eq!(r.1["disk_bus"], "sata", "{r:?}");
    let log = boot(5, "the fifth boot, its disks on SATA");
    assert_eq!(
        log.matches("bootdisk: hard disks 03").count(),
        threes + 1,
        "{log}"
    );
    let vmm_log = c.servers[primary].data.join("agent/vms/blank/vmm.log");
    let vmm_log = std::fs::read_to_string(vmm_log).unwrap_or_default();
    assert_eq!(
        vmm_log
            .matches("SATA disk on its vhost-user-blk backend")
            .count(),
        3,
        "{vmm_log}"
    );
    let audit = m.get("/api/v1/audit").1.to_string();
    assert!(audit.contains("disks on Sata"), "{audit}");
    // The cluster's guest kernel never has its disks on SATA.
    let r = m.send(
        "POST",
        "/api/v1/vms",
        Some(json!({"name": "kernel-sata", "memory_mib": 64, "disk_gib": 1, "disk_bus": "sata"})),
    );
    assert_eq!(r.0, 409, "{r:?}");
    assert!(r.1.to_string().contains("booted by its firmware"), "{r:?}");

    // Its firmware becomes UEFI (OVMF runs only in the test host: here the VM stays off).
    cluster::wait_for("the VM stopped a fifth time", WAIT, || {
        let v = m.get(&format!("/api/v1/vms/{vm}")).1;
        (v["status"] == "stopped").then_some(())
    });
    let r = edit(json!({"boot": "uefi"}));
    assert_eq!(r.0, 200, "{r:?}");
    assert_eq!(
        (r.1["boot"].clone(), r.1["boot_order"].clone()),
        (json!("uefi"), json!("disk_first"))
    );
    let audit = m.get("/api/v1/audit").1.to_string();
    assert!(audit.contains("boots Uefi"), "{audit}");
}

#[test]
fn a_manager_adds_a_server_that_waits_for_a_cluster() {
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start("add", &[]);
    let m = c.manager(1);
    let scratch = Scratch::new("add-server");
    let mut s4 = Server::new(
        4,
        format!("127.0.0.1:{}", free_port()),
        scratch.path("server4"),
        &[
            "--memory-mib",
            "2048",
            "--disk-gib",
            "32",
            "--blockd-listen",
            &format!("127.0.0.1:{}", free_port()),
        ],
    );
    s4.log_on_panic = LogOnPanic::Last(30);
    let token = s4.start_awaiting_join();
    let token = token.as_str();
    // W1.<its certificate's SHA-256>.<a secret>
    assert_eq!(token.len(), 100, "{token:?}");
    assert!(token.starts_with("W1."), "{token:?}");
    let add = |address: &str, token: &str| {
        m.send(
            "POST",
            "/api/v1/servers",
            Some(json!({ "address": address, "token": token })),
        )
    };
    let before = fingerprint(&m);
    let r = add(&s4.addr, "0123456789abcdef0123456789abcdef");
    assert_eq!(r.0, 400, "not a token: {r:?}");
    // The right certificate, a wrong secret: the waiting server refuses.
    let wrong_secret = format!("{}{}", &token[..68], "0".repeat(32));
    let r = add(&s4.addr, &wrong_secret);
    assert_eq!(r.0, 403, "a wrong token: {r:?}");
    assert!(r.1["error"].as_str().unwrap().contains("wrong join token"));
    // Another certificate than the token names: not the server the operator read it on.
    let other_cert = format!("W1.{}{}", "0".repeat(64), &token[67..]);
    let r = add(&s4.addr, &other_cert);
    assert_eq!(r.0, 502, "another server's certificate: {r:?}");
    assert!(
        r.1["error"]
            .as_str()
            .unwrap()
            .contains("not the one its token names"),
        "{r:?}"
    );
    let r = add(&format!("127.0.0.1:{}", free_port()), token);
    assert_eq!(r.0, 502, "nobody there: {r:?}");
    let r = add(&c.servers[0].addr, token);
    assert_eq!(r.0, 409, "a member: {r:?}");
    assert!(
        r.1["error"].as_str().unwrap().contains("a member already"),
        "{r:?}"
    );
    let r = m.send(
        "POST",
        "/api/v1/servers",
        Some(json!({"address": s4.addr, "token": token, "role": "boss"})),
    );
    assert_eq!(r.0, 400, "unknown fields: {r:?}");
    assert_eq!(fingerprint(&m), before, "refusals changed nothing");

    // Through `enspeed servers add`, as the Manager.
    let out = std::process::Command::new(enspeed_tests::enspeed_bin())
        .args(["servers", "add", &s4.addr, "--token", token])
        .env("ENSPEED_URL", &c.web[1])
        .env("ENSPEED_USER", "admin")
        .env("ENSPEED_PASSWORD", PASSWORD)
        .output()
        .expect("run enspeed servers add");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&s4.addr), "{text}");
    // Its agent registers what it offers; new VMs can be placed there.
    cluster::wait_for("server 4 offering its memory", WAIT, || {
        let s = m.get("/api/v1/servers").1;
        s.as_array()?
            .iter()
            .any(|s| s["id"] == 4 && s["memory_mib"] == 2048 && s["down"] == false)
            .then_some(())
    });
    let r = add(&s4.addr, token);
    assert_eq!(r.0, 409, "added once: {r:?}");
    let audit = m.get("/api/v1/audit?limit=1000").1;
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "server.add"
                && e["target"].as_str().unwrap().contains("server 4"))
    );
    // It restarts from its data as a member (no --await-join, no --join).
    s4.kill9();
    s4.start(&[]);
    let client = cluster::Client {
        connect: None,
        read: Duration::from_secs(5),
    };
    cluster::wait_for("server 4 back in the Raft group", WAIT, || {
        let st = client.call(&s4.addr, &json!({"op": "status"})).ok()?;
        (st["voters"].as_array()?.contains(&json!(4)) && st["leader"].is_u64()).then_some(())
    });
}

/// `enspeed disk` on the blockd of server `s` (its agent's control socket).
fn disk_cmd(s: &Server, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(enspeed_tests::enspeed_bin())
        .arg("disk")
        .arg("--control")
        .arg(s.data.join("agent/blockd.sock"))
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn a_vm_name_reused_after_a_delete_never_meets_the_old_disk_s_copies() {
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start("reuse", &[]);
    let m = c.manager(0);
    // What a deleted VM of another tenant left on both VM servers while they were down:
    // copies of its disk, holding its data, by the name a new VM's disk gets. The agents
    // remove such copies on their own too (the state has no disk by that name): the copies
    // are planted right before the new VM is created, and an attempt counts only where a
    // server found its copy still there when the new disk came (its log says so).
    const OLD: &str = "0123456789abcdef0123456789abcdef";
    const SECRET: &[u8] = b"the previous tenant's secret";
    const AT: u64 = 512 << 20;
    for s in &c.servers[..2] {
        cluster::wait_for("the agent's blockd", WAIT, || disk_cmd(s, &["status"]).ok());
    }
    let met = "disk copy deleted: a copy of another disk by this name";
    let mut found = None;
    for attempt in 0..8 {
        let name = format!("reuse{attempt}");
        let disk = format!("{name}-0");
        let before: Vec<usize> = c.servers[..2]
            .iter()
            .map(|s| s.log().matches(met).count())
            .collect();
        for s in &c.servers[..2] {
            if disk_cmd(s, &["create", &disk, "--size", "1G", "--disk-id", OLD]).is_err() {
                continue;
            }
            let data = s.data.join(format!("disks/{disk}/data"));
            if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&data) {
                let _ = std::os::unix::fs::FileExt::write_all_at(&f, SECRET, AT);
            }
        }
        let vm = id(&m.send(
            "POST",
            "/api/v1/vms",
            Some(json!({"name": name, "memory_mib": 64, "vcpus": 1, "disk_gib": 1, "start": true})),
        ));
        cluster::wait_for("the new VM running and mirrored", WAIT, || {
            let v = m.get(&format!("/api/v1/vms/{vm}")).1;
            (v["status"] == "running" && v["replication"]["state"] == "in-sync").then_some(())
        });
        let mut ids = Vec::new();
        for s in &c.servers[..2] {
            let st: Value =
                serde_json::from_str(&disk_cmd(s, &["status", &disk, "--json"]).unwrap()).unwrap();
            let disk_id = st[0]["disk_id"].as_str().unwrap().to_string();
            assert_ne!(disk_id, OLD, "server {} serves the old copy", s.id);
            ids.push(disk_id);
            let mut data = vec![0u8; SECRET.len()];
            std::os::unix::fs::FileExt::read_exact_at(
                &std::fs::File::open(s.data.join(format!("disks/{disk}/data"))).unwrap(),
                &mut data,
                AT,
            )
            .unwrap();
            assert_ne!(
                &data[..],
                SECRET,
                "server {}'s copy holds the old data",
                s.id
            );
        }
        assert_eq!(ids[0], ids[1], "both copies carry the new disk's identity");
        let after: Vec<usize> = c.servers[..2]
            .iter()
            .map(|s| s.log().matches(met).count())
            .collect();
        if before.iter().zip(&after).any(|(b, a)| a > b) {
            found = Some(attempt);
            break;
        }
    }
    assert!(
        found.is_some(),
        "in 8 attempts no agent met an old copy when the new disk came (each time both were \
         removed first, as copies of no disk)"
    );
}

#[test]
fn networks_are_the_managers_and_every_vm_card_gets_a_mac_of_its_own() {
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start("networks", &[]);
    let m = c.manager(0);
    let quota = json!({"vms": 4, "memory_mib": 1024, "disk_gib": 8});
    let user = |name: &str| json!({"name": name, "password": USER_PASSWORD, "role": "power_user", "quota": quota});
    let p = id(&m.send("POST", "/api/v1/users", Some(user("p"))));
    let q = id(&m.send("POST", "/api/v1/users", Some(user("q"))));
    let lan = json!({"name": "lan", "bridge": "br-lan", "uplink": "eth1", "vlan": 10, "subnet": "10.20.0.0/24"});
    let made = m.send("POST", "/api/v1/networks", Some(lan));
    assert_eq!(made.0, 201, "{made:?}");
    assert_eq!(made.1["bridge"], "br-lan");
    let pnet = json!({"name": "p-net", "bridge": "br-p", "vlan": 20, "company": p});
    assert_eq!(m.send("POST", "/api/v1/networks", Some(pnet)).0, 201);
    for (body, status, says) in [
        (json!({"name": "lan", "bridge": "br-x"}), 409, "exists"),
        (
            json!({"name": "x", "bridge": "br-lan"}),
            409,
            "network lan's",
        ),
        (
            json!({"name": "x", "bridge": "br x"}),
            409,
            "interface name",
        ),
        (
            json!({"name": "x", "bridge": "br-x", "vlan": 5000}),
            409,
            "VLAN 5000",
        ),
        (
            json!({"name": "x", "bridge": "br-x", "subnet": "10.0.0.1/8"}),
            409,
            "host bits",
        ),
        (
            json!({"name": "x", "bridge": "br-x", "mtu": 9000}),
            400,
            "unknown field",
        ),
    ] {
        let r = m.send("POST", "/api/v1/networks", Some(body.clone()));
        assert_eq!(r.0, status, "{body}: {r:?}");
        assert!(
            r.1["error"].as_str().unwrap_or("").contains(says),
            "{body}: {r:?}"
        );
    }
    let wp = Web::logged_in(&c.web[1], "p", USER_PASSWORD);
    let wq = Web::logged_in(&c.web[2], "q", USER_PASSWORD);
    let refused = wp.send(
        "POST",
        "/api/v1/networks",
        Some(json!({"name": "mine", "bridge": "br-m"})),
    );
    assert_eq!(refused.0, 403, "{refused:?}");
    // Each tenant sees the shared network and its own, never where they are built.
    let names = |w: &Web| -> Vec<String> {
        let l = w.get("/api/v1/networks");
        assert_eq!(l.0, 200, "{l:?}");
        assert!(
            l.1.as_array()
                .unwrap()
                .iter()
                .all(|n| n.get("bridge").is_none() && n.get("company").is_none()),
            "{l:?}"
        );
        l.1.as_array()
            .unwrap()
            .iter()
            .map(|n| n["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(&wp), ["lan", "p-net"]);
    assert_eq!(names(&wq), ["lan"]);
    // A VM's cards: a MAC each, locally administered and unique in the cluster.
    let mut vm = new_vm("web", p);
    vm["networks"] = json!(["lan", "p-net"]);
    let web = wp.send("POST", "/api/v1/vms", Some(vm));
    assert_eq!(web.0, 201, "{web:?}");
    let shown = wp.get(&format!("/api/v1/vms/{}", id(&web))).1;
    let nics = shown["nics"].as_array().unwrap().clone();
    assert_eq!(
        nics.iter()
            .map(|n| n["network"].clone())
            .collect::<Vec<_>>(),
        [json!("lan"), json!("p-net")]
    );
    let macs: BTreeSet<String> = nics
        .iter()
        .map(|n| n["mac"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(macs.len(), 2, "{nics:?}");
    assert!(
        macs.iter()
            .all(|m| m.starts_with("02:45:53:") && m.len() == 17),
        "{macs:?}"
    );
    // On "lan" (a subnet, its router the first address) the card is leased the next one;
    // "p-net" has no subnet, so no lease.
    assert_eq!(nics[0]["ip"], "10.20.0.2", "{nics:?}");
    assert!(nics[1].get("ip").is_none(), "{nics:?}");
    assert_eq!(nics[0]["addresses"], json!([]), "not running: nothing seen");
    // Another company's network is not there for q; five cards are too many.
    let mut vm = new_vm("other", q);
    vm["networks"] = json!(["p-net"]);
    let r = wq.send("POST", "/api/v1/vms", Some(vm));
    assert_eq!(r.0, 404, "{r:?}");
    assert!(
        r.1["error"].as_str().unwrap().contains("no network p-net"),
        "{r:?}"
    );
    let mut vm = new_vm("other", q);
    vm["networks"] = json!(["lan", "lan", "lan", "lan", "lan"]);
    assert_eq!(wq.send("POST", "/api/v1/vms", Some(vm)).0, 409);
    // A clone is on the same networks with MACs of its own.
    let clone = wp.send(
        "POST",
        &format!("/api/v1/vms/{}/clone", id(&web)),
        Some(json!({"name": "web2"})),
    );
    assert!((200..300).contains(&clone.0), "{clone:?}");
    let cl = wp.get(&format!("/api/v1/vms/{}", id(&clone))).1;
    let cmacs: BTreeSet<String> = cl["nics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["mac"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(cmacs.len(), 2);
    assert!(cmacs.is_disjoint(&macs), "{cmacs:?} {macs:?}");
    assert_eq!(
        cl["nics"][0]["ip"], "10.20.0.3",
        "a clone gets its own lease"
    );
    // Started, a VM whose network's uplink NIC its server lacks does not run, and says why:
    // the details to a Manager, the gist to its owner.
    let web_id = id(&web);
    let on = wp.send(
        "POST",
        &format!("/api/v1/vms/{web_id}/power"),
        Some(json!({"action": "on"})),
    );
    assert_eq!(on.0, 202, "{on:?}");
    let why = cluster::wait_for("the VM's error", Duration::from_secs(30), || {
        let v = m.get(&format!("/api/v1/vms/{web_id}")).1;
        v["error"].as_str().map(str::to_string)
    });
    assert!(
        why.contains("uplink NIC eth1 is not on this server"),
        "{why}"
    );
    // The Power User's server may not have applied the agent's report yet: wait for it there.
    let told = cluster::wait_for(
        "the VM's error as its Power User sees it",
        Duration::from_secs(30),
        || {
            let v = wp.get(&format!("/api/v1/vms/{web_id}")).1;
            v["error"].is_string().then_some(v)
        },
    );
    assert_eq!(told["status"], "starting", "{told}");
    assert!(
        told["error"]
            .as_str()
            .unwrap()
            .contains("its network is not available"),
        "{told}"
    );
    assert!(!told["error"].as_str().unwrap().contains("eth1"), "{told}");
    let off = wp.send(
        "POST",
        &format!("/api/v1/vms/{web_id}/power"),
        Some(json!({"action": "force-off"})),
    );
    assert_eq!(off.0, 202, "{off:?}");
    // On a network of its server's own bridge, a running VM's card is a tap in that bridge,
    // given to its VMM with its MAC; stopped, the tap is gone.
    let bridge = format!("esbr{}", std::process::id() % 100_000);
    let local = json!({"name": "local", "bridge": bridge, "subnet": "10.21.0.0/24",
        "gateway": "10.21.0.254", "dns": ["10.21.0.53"]});
    let made = m.send("POST", "/api/v1/networks", Some(local));
    assert_eq!(made.0, 201, "{made:?}");
    assert_eq!(made.1["gateway"], "10.21.0.254");
    assert_eq!(made.1["dns"], json!(["10.21.0.53"]));
    let mut vm = new_vm("plugged", q);
    vm["networks"] = json!(["local"]);
    vm["start"] = json!(true);
    let plugged = wq.send("POST", "/api/v1/vms", Some(vm));
    let pid_ = id(&plugged);
    let mac = wq.get(&format!("/api/v1/vms/{pid_}")).1["nics"][0]["mac"]
        .as_str()
        .unwrap()
        .to_string();
    let running = cluster::wait_for("the VM running", Duration::from_secs(60), || {
        let v = wq.get(&format!("/api/v1/vms/{pid_}")).1;
        (v["status"] == "running").then_some(v)
    });
    // Its server's own tap (netdev::tap_name: VMID, card, server, in hexadecimal).
    let server = running["primary"]["server"].as_u64().unwrap();
    let tap = format!("e{pid_:x}n0s{server:x}");
    let master = std::fs::read_link(format!("/sys/class/net/{tap}/master")).unwrap_or_default();
    assert!(
        master.ends_with(&bridge),
        "tap {tap} in {master:?}, not {bridge}"
    );
    let vmm = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .find(|c| c.contains(" vmm ") && c.contains(&format!("tap={tap},mac={mac}")));
    assert!(vmm.is_some(), "no VMM was given --net tap={tap},mac={mac}");
    // Its bridge filter: its MAC, its lease (10.21.0.1: the router is .254), nothing else.
    let chain = std::process::Command::new("nft")
        .args(["list", "chain", "bridge", "enspeed", &format!("card-{tap}")])
        .output()
        .unwrap();
    let chain = String::from_utf8_lossy(&chain.stdout);
    assert!(
        chain.contains(&format!("ether saddr != {mac} drop"))
            && chain.contains("ip saddr != 10.21.0.1 drop"),
        "{chain}"
    );
    let off = wq.send(
        "POST",
        &format!("/api/v1/vms/{pid_}/power"),
        Some(json!({"action": "force-off"})),
    );
    assert_eq!(off.0, 202);
    cluster::wait_for("the tap removed", Duration::from_secs(30), || {
        (!std::path::Path::new(&format!("/sys/class/net/{tap}")).exists()).then_some(())
    });
    // Its filter follows the tap (removed right after it).
    cluster::wait_for("the tap's filter removed", Duration::from_secs(10), || {
        let table = std::process::Command::new("nft")
            .args(["list", "table", "bridge", "enspeed"])
            .output()
            .unwrap();
        (!String::from_utf8_lossy(&table.stdout).contains(&tap)).then_some(())
    });
    let _ = std::process::Command::new("ip")
        .args(["link", "del", &bridge])
        .status();

    // A network with VMs on it stays; the CLI lists and deletes.
    let del = m.send("DELETE", "/api/v1/networks/lan", None);
    assert_eq!(del.0, 409, "{del:?}");
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(enspeed_tests::enspeed_bin())
            .args(args)
            .env("ENSPEED_URL", &c.web[0])
            .env("ENSPEED_USER", "admin")
            .env("ENSPEED_PASSWORD", PASSWORD)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, listed) = cli(&["network", "list"]);
    assert!(
        ok && listed.contains("br-lan") && listed.contains("10.20.0.0/24"),
        "{listed}"
    );
    let (ok, made) = cli(&[
        "network", "create", "spare", "--bridge", "br-spare", "--vlan", "30",
    ]);
    assert!(ok && made.contains("br-spare"), "{made}");
    let (ok, _) = cli(&["network", "delete", "spare"]);
    assert!(ok);
    let (ok, again) = cli(&["network", "delete", "spare"]);
    assert!(!ok && again.contains("no network spare"), "{again}");
}

/// The files of server `s`'s library directory that are not `<sha>.iso` or `<sha>.raw` of
/// `listed` (work directories, uploads, unlisted images): what a refused import must not leave.
fn library_leftovers(s: &Server, listed: &[String]) -> Vec<String> {
    let dir = s.data.join("isos");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            !listed
                .iter()
                .any(|sha| *n == format!("{sha}.raw") || *n == format!("{sha}.iso"))
        })
        .collect()
}

/// The entries of tar archive `bytes` (ustar, as the export writes it): names and contents.
fn untar(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 512 <= bytes.len() && bytes[at] != 0 {
        let h = &bytes[at..at + 512];
        let name = String::from_utf8_lossy(&h[..100])
            .trim_end_matches('\0')
            .to_string();
        let size_text = String::from_utf8_lossy(&h[124..136]);
        let size = u64::from_str_radix(size_text.trim_matches(|c: char| c == '\0' || c == ' '), 8)
            .unwrap() as usize;
        out.push((name, bytes[at + 512..at + 512 + size].to_vec()));
        at += 512 + size.div_ceil(512) * 512;
    }
    out
}

#[test]
fn an_ova_in_each_disk_format_is_imported_booted_exported_and_imported_back() {
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start("appliance", &[]);
    let m = c.manager(0);
    let scratch = Scratch::new("appliance-ovas");
    // The boot disk (a BIOS boots it from a hard disk, it powers the VM off): as qcow2, as a
    // stream-optimized VMDK and raw, each in an OVA as other vendors' tools make them.
    let raw = enspeed_tests::bootdisk();
    let mut sha = None;
    for (name, format, manifest) in [
        ("app-qcow2", "qcow2", true),
        ("app-vmdk", "vmdk", true),
        ("app-raw", "raw", false),
    ] {
        let dir = scratch.path(name);
        std::fs::create_dir_all(&dir).unwrap();
        let ova = enspeed_tests::ova::one_disk(name, &raw, format, &dir, manifest);
        let r = m.put_bytes(&format!("/api/v1/appliances/{name}"), &ova);
        assert_eq!(r.0, 201, "{name}: {r:?}");
        assert_eq!(
            (
                &r.1["memory_mib"],
                &r.1["vcpus"],
                &r.1["boot"],
                &r.1["disk_bus"]
            ),
            (&json!(128), &json!(1), &json!("bios"), &json!("sata")),
            "{r:?}"
        );
        assert_eq!(
            r.1["disks"][0]["size"],
            json!(std::fs::metadata(&raw).unwrap().len())
        );
        // Every format gives the same raw image, to the byte.
        let s = r.1["disks"][0]["sha256"].as_str().unwrap().to_string();
        assert_eq!(sha.get_or_insert(s.clone()), &s, "{name}");
    }
    let sha = sha.unwrap();
    let again = m.put_bytes("/api/v1/appliances/app-raw", b"x");
    assert_eq!(again.0, 409, "{again:?}");
    let copy = |s: &Server| s.data.join("isos").join(format!("{sha}.raw"));
    assert_eq!(
        std::fs::read(copy(&c.servers[0])).unwrap(),
        std::fs::read(&raw).unwrap(),
        "the library's image is the disk, raw"
    );

    // Hostile archives: each refused with the reason, nothing listed, nothing left behind.
    let disk = std::fs::read(&raw).unwrap();
    let ovf = enspeed_tests::ova::ovf("evil", 128, 1, 0, &[("d.raw", disk.len() as u64)]);
    let tar = enspeed_tests::ova::tar;
    let good = |d: &[u8]| tar(&[("evil.ovf", ovf.as_bytes()), ("d.raw", d)]);
    let dir = scratch.path("evil");
    std::fs::create_dir_all(&dir).unwrap();
    let run = |args: &[&str]| {
        let st = std::process::Command::new("qemu-img")
            .args(args)
            .current_dir(&dir)
            .status()
            .unwrap();
        assert!(st.success(), "qemu-img {args:?}");
        std::fs::read(dir.join(args[args.len() - if args.contains(&"-b") { 1 } else { 2 }]))
            .unwrap_or_default()
    };
    let backed = run(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "/etc/hostname",
        "-F",
        "raw",
        "backed.qcow2",
    ]);
    let huge = run(&["create", "-q", "-f", "qcow2", "huge.qcow2", "60T"]);
    let laughs = r#"<?xml version="1.0"?><!DOCTYPE Envelope [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]><Envelope>&b;</Envelope>"#;
    let descriptor = b"# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"/etc/passwd\" 0\n";
    let mf =
        enspeed_tests::ova::manifest(&[("evil.ovf", ovf.as_bytes()), ("d.raw", b"other bytes")]);
    let wrong_mf = tar(&[
        ("evil.ovf", ovf.as_bytes()),
        ("evil.mf", mf.as_bytes()),
        ("d.raw", &disk),
    ]);
    let whole = good(&disk);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "dotdot",
            tar(&[("../evil.ovf", ovf.as_bytes()), ("d.raw", &disk)]),
            "only plain file names",
        ),
        (
            "absolute",
            tar(&[("/tmp/evil.ovf", ovf.as_bytes()), ("d.raw", &disk)]),
            "only plain file names",
        ),
        (
            "symlink",
            enspeed_tests::ova::tar_typed(&[
                ("evil.ovf", ovf.as_bytes(), b'0'),
                ("d.raw", b"", b'2'),
            ]),
            "plain files only",
        ),
        ("manifest", wrong_mf, "does not match the manifest"),
        (
            "truncated",
            whole[..whole.len() / 2 + 100].to_vec(),
            "cut short",
        ),
        (
            "laughs",
            tar(&[("evil.ovf", laughs.as_bytes()), ("d.raw", &disk)]),
            "not XML we read",
        ),
        ("backing", good(&backed), "backing file"),
        ("bomb", good(&huge), "expand"),
        ("descriptor", good(descriptor), "naming other files"),
        ("noova", b"this is no archive at all".repeat(40), "no .ovf"),
        (
            "nodisk",
            tar(&[("evil.ovf", ovf.as_bytes())]),
            "not in the archive",
        ),
    ];
    for (name, bytes, why) in &cases {
        let r = m.put_bytes(&format!("/api/v1/appliances/{name}"), bytes);
        assert_eq!(r.0, 422, "{name}: {r:?}");
        let e = r.1["error"].as_str().unwrap_or_default();
        assert!(e.contains(why), "{name}: {e:?} should say {why:?}");
    }
    let listed = m.get("/api/v1/appliances").1;
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["app-qcow2", "app-raw", "app-vmdk"]);
    assert_eq!(
        library_leftovers(&c.servers[0], std::slice::from_ref(&sha)),
        Vec::<String>::new()
    );

    // Each import was a task of the server that took the upload: those that reached their
    // conversion are listed, done or failed with why.
    let tasks = m.get("/api/v1/tasks").1;
    let imports: Vec<&Value> = tasks
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["kind"] == "import")
        .collect();
    for name in ["app-qcow2", "app-vmdk", "app-raw"] {
        let t = imports
            .iter()
            .find(|t| t["appliance"] == name)
            .unwrap_or_else(|| panic!("{name}'s import task: {tasks}"));
        assert_eq!(
            (&t["state"], &t["percent"]),
            (&json!("done"), &json!(100)),
            "{t}"
        );
    }
    let backing = imports
        .iter()
        .find(|t| t["appliance"] == "backing")
        .unwrap_or_else(|| panic!("the backing file's import task: {tasks}"));
    assert_eq!(backing["state"], "failed", "{backing}");
    assert!(
        backing["reason"]
            .as_str()
            .is_some_and(|r| r.contains("backing file")),
        "{backing}"
    );

    // Resumable uploads: an archive sent in parts, one of them cut off on the way and resumed
    // where the server says; with its last byte its import begins, a task, whose end adds the
    // appliance. Its stream-optimized VMDK is decoded as the parts arrive.
    let dir = scratch.path("parts");
    std::fs::create_dir_all(&dir).unwrap();
    let ova = enspeed_tests::ova::one_disk("app-parts", &raw, "vmdk", &dir, true);
    let open = |kind: &str, name: &str, size: usize| {
        m.send(
            "POST",
            "/api/v1/uploads",
            Some(json!({"kind": kind, "name": name, "size": size})),
        )
    };
    let r = open("appliance", "app-parts", ova.len());
    assert_eq!((r.0, &r.1["received"]), (201, &json!(0)), "{r:?}");
    let up = r.1["id"].as_str().unwrap().to_string();
    let third = ova.len() / 3;
    let r = m.upload_part(&up, 0, &ova[..third]);
    assert_eq!((r.0, &r.1["received"]), (200, &json!(third)), "{r:?}");
    let r = m.upload_part(&up, 0, &ova[..10]);
    assert_eq!(
        r.0, 409,
        "a part that starts where the server is not: {r:?}"
    );
    let e = r.1["error"].as_str().unwrap_or_default();
    assert!(e.contains(&format!("Upload-Offset: {third}")), "{e}");
    let rest = (ova.len() - third) as u64;
    let answer = m.upload_part_cut_off(&up, third as u64, rest, &ova[third..2 * third]);
    assert!(answer.is_empty() || answer.contains(" 400 "), "{answer}");
    let held = m.get(&format!("/api/v1/uploads/{up}"));
    assert_eq!(
        held.1["received"],
        json!(2 * third),
        "what arrived stays: {held:?}"
    );
    let r = m.upload_part(&up, 2 * third as u64, &ova[2 * third..]);
    assert_eq!((r.0, &r.1["kind"]), (202, &json!("import")), "{r:?}");
    let task = r.1["id"].as_u64().unwrap();
    let t = cluster::wait_for("the import of the resumed upload ends", WAIT, || {
        let t = m.get("/api/v1/tasks").1;
        let t = t.as_array()?.iter().find(|t| t["id"] == task)?.clone();
        (t["state"] != "running").then_some(t)
    });
    assert_eq!(t["state"], "done", "{t}");
    let l = m.get("/api/v1/appliances").1;
    let a = l
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "app-parts");
    let a = a.unwrap_or_else(|| panic!("app-parts listed: {l}"));
    assert_eq!(a["disks"][0]["sha256"], json!(sha), "the same image: {a}");
    assert_eq!(m.get(&format!("/api/v1/uploads/{up}")).0, 404, "ended");
    let r = m.send("DELETE", "/api/v1/appliances/app-parts", None);
    assert_eq!(r.0, 200, "{r:?}");
    // An ISO likewise: added with the last part, its SHA-256 the bytes'.
    let iso: Vec<u8> = (0..3u32 << 18).flat_map(|i| i.to_le_bytes()).collect();
    let r = open("iso", "parts.iso", iso.len());
    let up = r.1["id"].as_str().unwrap().to_string();
    let half = iso.len() / 2;
    assert_eq!(m.upload_part(&up, 0, &iso[..half]).0, 200);
    // Its name taken meanwhile: the last part is refused, and the upload kept, whole.
    let other = m.put_bytes("/api/v1/isos/parts.iso", b"another ISO");
    assert_eq!(other.0, 201, "{other:?}");
    let r = m.upload_part(&up, half as u64, &iso[half..]);
    assert_eq!(r.0, 409, "{r:?}");
    let e = r.1["error"].as_str().unwrap_or_default();
    assert!(e.contains("the upload is kept"), "{e}");
    let held = m.get(&format!("/api/v1/uploads/{up}"));
    assert_eq!(held.1["received"], json!(iso.len()), "{held:?}");
    // The name free again, an empty part at its end asks again: no byte sent twice.
    let r = m.send("DELETE", "/api/v1/isos/parts.iso", None);
    assert_eq!(r.0, 200, "{r:?}");
    let r = m.upload_part(&up, iso.len() as u64, &[]);
    assert_eq!(r.0, 201, "{r:?}");
    assert_eq!(m.get(&format!("/api/v1/uploads/{up}")).0, 404, "ended");
    use sha2::Digest;
    let want: String = sha2::Sha256::digest(&iso)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(r.1["sha256"], json!(want), "{r:?}");
    // A bad archive is refused by the part that shows it, and the upload ends.
    let (_, evil, why) = &cases[0];
    let r = open("appliance", "evil-parts", evil.len());
    let up = r.1["id"].as_str().unwrap().to_string();
    let r = m.upload_part(&up, 0, evil);
    assert_eq!(r.0, 422, "{r:?}");
    let e = r.1["error"].as_str().unwrap_or_default();
    assert!(e.contains(why), "{e}");
    assert_eq!(m.get(&format!("/api/v1/uploads/{up}")).0, 404);
    // Bounded: eight open on a server at once; a part over the size is refused.
    let ids: Vec<String> = (0..8)
        .map(|i| {
            let r = open("iso", &format!("open{i}.iso"), 10);
            assert_eq!(r.0, 201, "{i}: {r:?}");
            r.1["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(open("iso", "open8.iso", 10).0, 503);
    assert_eq!(m.upload_part(&ids[0], 0, &[0u8; 11]).0, 400);
    for id in &ids {
        let r = m.send("DELETE", &format!("/api/v1/uploads/{id}"), None);
        assert_eq!(r.0, 200, "{r:?}");
    }
    let listed: Vec<String> = [sha.clone(), want.clone()].into();
    // The ISO deleted above goes with the agent's next clean-up.
    cluster::wait_for("no leftovers in the library", WAIT, || {
        library_leftovers(&c.servers[0], &listed)
            .is_empty()
            .then_some(())
    });
    let r = m.send("DELETE", "/api/v1/isos/parts.iso", None);
    assert_eq!(r.0, 200, "{r:?}");

    // Shared with a Power User's company only when a Manager says so.
    let quota = json!({"vms": 2, "memory_mib": 1024, "disk_gib": 4});
    let p = id(&m.send(
        "POST",
        "/api/v1/users",
        Some(json!({"name": "apower", "password": USER_PASSWORD, "role": "power_user", "quota": quota})),
    ));
    let pw = Web::logged_in(&c.web[0], "apower", USER_PASSWORD);
    assert_eq!(pw.get("/api/v1/appliances").1, json!([]));
    let from = |w: &Web, vm: &str, app: &str| {
        w.send(
            "POST",
            "/api/v1/vms",
            Some(json!({"name": vm, "appliance": app, "start": true})),
        )
    };
    assert_eq!(from(&pw, "pvm", "app-qcow2").0, 404);
    let r = m.send(
        "PATCH",
        "/api/v1/appliances/app-qcow2",
        Some(json!({"shared_with": [p], "description": "the boot disk"})),
    );
    assert_eq!(r.0, 200, "{r:?}");
    assert_eq!(r.1["shared_with"], json!([p]));
    let seen = pw.get("/api/v1/appliances").1;
    assert_eq!(seen[0]["name"], "app-qcow2", "{seen}");
    assert!(
        seen[0].get("shared_with").is_none(),
        "whom it is shared with is the Manager's: {seen}"
    );

    // A VM from it: once both VM servers hold the image, on either; its disk starts as the
    // image, its BIOS boots it, and it powers itself off.
    cluster::wait_for("both VM servers hold the appliance", WAIT, || {
        let l = m.get("/api/v1/appliances").1;
        (l[0]["servers"] == json!([1, 2])).then_some(())
    });
    assert_eq!(
        std::fs::read(copy(&c.servers[1])).unwrap(),
        disk,
        "copied whole"
    );
    let r = from(&pw, "pvm", "app-qcow2");
    assert_eq!(r.0, 201, "{r:?}");
    assert_eq!(
        (&r.1["boot"], &r.1["disk_bus"]),
        (&json!("bios"), &json!("sata"))
    );
    let vm = id(&r);
    let primary = m.get(&format!("/api/v1/vms/{vm}")).1["primary"]["server"]
        .as_u64()
        .unwrap() as usize
        - 1;
    let serial = c.servers[primary].data.join("agent/vms/pvm/serial.log");
    cluster::wait_for(
        "the appliance's disk booted and powered the VM off",
        WAIT,
        || {
            let log = std::fs::read_to_string(&serial).unwrap_or_default();
            (log.contains("bootdisk: stage 2 read through int 13h")
                && log.contains("S5 sleep type 5; powering off"))
            .then_some(())
        },
    );
    assert!(!std::fs::read_to_string(&serial)
        .unwrap()
        .contains("bootdisk: FAIL"));
    let audit = m.get("/api/v1/audit").1.to_string();
    for want in ["appliance.import", "appliance.edit", "vm.create"] {
        assert!(audit.contains(want), "{want} in {audit}");
    }

    // Copied back, once off, into a new appliance (its Power User's company's): the disk as
    // it is now (the boot disk writes nothing: the same image); the VM stays off meanwhile.
    cluster::wait_for("the VM stopped", WAIT, || {
        (m.get(&format!("/api/v1/vms/{vm}")).1["status"] == "stopped").then_some(())
    });
    let r = pw.send(
        "POST",
        &format!("/api/v1/vms/{vm}/copy-back"),
        Some(json!({"name": "pvm-tpl", "description": "pvm, set up"})),
    );
    assert_eq!(r.0, 202, "{r:?}");
    assert_eq!(r.1["kind"], "copy_back");
    let task = r.1["id"].as_u64().unwrap();
    let again = pw.send(
        "POST",
        &format!("/api/v1/vms/{vm}/copy-back"),
        Some(json!({"name": "app-raw"})),
    );
    assert_eq!(again.0, 409, "a name taken: {again:?}");
    let done = cluster::wait_for("the copy back ends", WAIT, || {
        let t = pw.get("/api/v1/tasks").1;
        let t = t.as_array()?.iter().find(|t| t["id"] == task)?.clone();
        (t["state"] != "running").then_some(t)
    });
    assert_eq!(
        (&done["state"], &done["percent"]),
        (&json!("done"), &json!(100)),
        "{done}"
    );
    let tpl = pw.get("/api/v1/appliances").1;
    let tpl = tpl
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "pvm-tpl")
        .cloned()
        .unwrap_or_else(|| panic!("pvm-tpl is the company's: {tpl}"));
    assert_eq!(tpl["disks"][0]["sha256"], json!(sha), "{tpl}");
    assert_eq!(tpl["description"], "pvm, set up");
    assert!(tpl["origin"].as_str().unwrap().contains("copy back of VM"));
    assert!(m
        .get("/api/v1/audit")
        .1
        .to_string()
        .contains("appliance.copy_back"));

    // Exported: an OVA whose descriptor comes first, whose VMDK QEMU reads as the same disk,
    // and which, imported again, gives the same image to the bit.
    let (status, ova) = m.get_bytes("/api/v1/appliances/app-qcow2/ova");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&ova));
    let entries = untar(&ova);
    let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        names,
        ["app-qcow2.ovf", "app-qcow2.mf", "app-qcow2-disk0.vmdk"]
    );
    let vmdk = scratch.path("exported.vmdk");
    std::fs::write(&vmdk, &entries[2].1).unwrap();
    let same = std::process::Command::new("qemu-img")
        .args(["compare", "-q", "-f", "vmdk", "-F", "raw"])
        .arg(&vmdk)
        .arg(&raw)
        .status()
        .unwrap();
    assert!(
        same.success(),
        "qemu-img reads the exported VMDK as the disk"
    );
    assert_eq!(pw.get_bytes("/api/v1/appliances/app-qcow2/ova").0, 403);
    let r = m.put_bytes("/api/v1/appliances/again", &ova);
    assert_eq!(r.0, 201, "{r:?}");
    assert_eq!(
        r.1["disks"][0]["sha256"],
        json!(sha),
        "exported and imported back, bit-identical"
    );
    assert_eq!(r.1["description"], "the boot disk");

    // From an appliance directory: its catalogue lists the OVA with its SHA-256; a download
    // is a task of a VM server, read as it arrives and checked; a wrong checksum, something
    // not an OVA, a missing file each end the task failed with why, nothing listed.
    let ova_sha: String = {
        use sha2::Digest;
        sha2::Sha256::digest(&ova)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let site = enspeed_tests::web::serve_files(|site| {
        let entry = |name: &str, sha: &str, file: &str| {
            json!({"name": name, "description": format!("{name} of the directory"),
                   "size": ova.len(), "sha256": sha, "url": format!("{site}/dir/{file}")})
        };
        let catalogue = json!([
            entry("from-dir", &ova_sha, "app.ova"),
            entry("wrong-sum", &"0".repeat(64), "app.ova"),
            entry("not-an-ova", &ova_sha, "junk.ova"),
            entry("gone", &ova_sha, "gone.ova"),
        ]);
        vec![
            ("/dir/app.ova".into(), ova.clone()),
            ("/dir/junk.ova".into(), vec![0x5au8; 300_000]),
            ("/dir/bad.json".into(), b"{\"not\": \"a list\"}".to_vec()),
            (
                "/dir/catalogue.json".into(),
                catalogue.to_string().into_bytes(),
            ),
        ]
    });
    let dir_url = |file: &str| {
        let q: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("url", &format!("{site}/dir/{file}"))
            .finish();
        format!("/api/v1/appliance-directory?{q}")
    };
    let listed = m.get(&dir_url("catalogue.json"));
    assert_eq!(listed.0, 200, "{listed:?}");
    let names: Vec<&str> = listed
        .1
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["from-dir", "wrong-sum", "not-an-ova", "gone"]);
    assert_eq!(listed.1[0]["in_library"], json!(false));
    assert_eq!(pw.get(&dir_url("catalogue.json")).0, 403, "Managers only");
    let bad = m.get(&dir_url("bad.json"));
    assert!(
        bad.0 == 502 && bad.1.to_string().contains("not a catalogue"),
        "{bad:?}"
    );
    assert_eq!(m.get(&dir_url("nothing.json")).0, 502);
    assert_eq!(
        m.get("/api/v1/appliance-directory?url=file%3A%2F%2F%2Fetc%2Fpasswd")
            .0,
        400
    );
    let start = |e: &Value| {
        let r = m.send(
            "POST",
            &format!(
                "/api/v1/appliances/{}/download",
                e["name"].as_str().unwrap()
            ),
            Some(json!({"url": e["url"], "sha256": e["sha256"]})),
        );
        assert_eq!((r.0, &r.1["kind"]), (202, &json!("download")), "{r:?}");
        r.1["id"].as_u64().unwrap()
    };
    let ended = |task: u64| {
        cluster::wait_for("the download ends", WAIT, || {
            let t = m.get("/api/v1/tasks").1;
            let t = t.as_array()?.iter().find(|t| t["id"] == task)?.clone();
            (t["state"] != "running").then_some(t)
        })
    };
    let entries = listed.1.as_array().unwrap().clone();
    let tasks: Vec<u64> = entries.iter().map(start).collect();
    let done = ended(tasks[0]);
    assert_eq!(
        (&done["state"], &done["percent"]),
        (&json!("done"), &json!(100)),
        "{done}"
    );
    assert_eq!(done["total_bytes"], json!(ova.len()), "{done}");
    for (task, why) in tasks[1..].iter().zip(["SHA-256", "not a tar", "404"]) {
        let t = ended(*task);
        assert_eq!(t["state"], "failed", "{t}");
        assert!(t["reason"].as_str().unwrap().contains(why), "{why}: {t}");
    }
    let all = m.get("/api/v1/appliances").1;
    let a = all
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "from-dir")
        .unwrap();
    assert_eq!(
        a["disks"][0]["sha256"],
        json!(sha),
        "downloaded, the same image: {a}"
    );
    assert!(
        a["origin"]
            .as_str()
            .unwrap()
            .contains("downloaded from http://"),
        "{a}"
    );
    let names: BTreeSet<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "again",
            "app-qcow2",
            "app-raw",
            "app-vmdk",
            "from-dir",
            "pvm-tpl"
        ]
        .into(),
        "no failed download listed"
    );
    assert_eq!(
        m.get(&dir_url("catalogue.json")).1[0]["in_library"],
        json!(true)
    );
    let taken = m.send(
        "POST",
        "/api/v1/appliances/from-dir/download",
        Some(json!({"url": entries[0]["url"]})),
    );
    assert_eq!(taken.0, 409, "{taken:?}");
    let ftp = m.send(
        "POST",
        "/api/v1/appliances/x/download",
        Some(json!({"url": "ftp://host/a.ova"})),
    );
    assert_eq!(ftp.0, 400, "{ftp:?}");

    // The original product's zip of disk images and an appliance.xml: the disk stored (read
    // in place) or deflated (inflated first), the same image; hostile zips refused.
    let zdir = scratch.path("zip");
    std::fs::create_dir_all(&zdir).unwrap();
    let qcow2 = std::fs::read(enspeed_tests::ova::convert(&raw, "qcow2", &zdir)).unwrap();
    let xml = |file: &str| {
        format!(
            r#"<?xml version="1.0"?>
<VirtualAppliance name="legacy" memory="96" vcpus="2" firmware="bios" nics="1">
  <Description>from the original product</Description>
  <Disk file="{file}"/>
</VirtualAppliance>"#
        )
    };
    let mut deflated = Vec::new();
    for (name, file, bytes, stored) in [
        ("zip-stored", "disk0.img", &disk, true),
        ("zip-deflated", "disk0.qcow2", &qcow2, false),
    ] {
        let x = xml(file);
        let z = enspeed_tests::ova::zip(
            &zdir,
            &[
                ("appliance.xml", x.as_bytes(), false),
                (file, bytes, stored),
            ],
        );
        let r = m.put_bytes(&format!("/api/v1/appliances/{name}"), &z);
        deflated = z;
        assert_eq!(r.0, 201, "{name}: {r:?}");
        assert_eq!(
            r.1["disks"][0]["sha256"],
            json!(sha),
            "{name}: the same image"
        );
        assert_eq!((&r.1["memory_mib"], &r.1["vcpus"]), (&json!(96), &json!(2)));
        assert_eq!(r.1["description"], "from the original product");
    }
    // A zip downloaded from a directory is imported the same way.
    let zsite = enspeed_tests::web::serve_files(|_| vec![("/legacy.zip".into(), deflated)]);
    let r = m.send(
        "POST",
        "/api/v1/appliances/zip-dl/download",
        Some(json!({"url": format!("{zsite}/legacy.zip")})),
    );
    assert_eq!(r.0, 202, "{r:?}");
    let t = ended(r.1["id"].as_u64().unwrap());
    assert_eq!(t["state"], "done", "{t}");
    let all = m.get("/api/v1/appliances").1;
    let z = all
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "zip-dl");
    let z = z.unwrap_or_else(|| panic!("zip-dl listed: {all}"));
    assert_eq!(
        (&z["disks"][0]["sha256"], &z["memory_mib"]),
        (&json!(sha), &json!(96)),
        "{z}"
    );
    let x = xml("disk0.img");
    for (why, z) in [
        (
            "only plain files",
            enspeed_tests::ova::zip(
                &zdir,
                &[
                    ("appliance.xml", x.as_bytes(), true),
                    ("../disk0.img", &disk, true),
                ],
            ),
        ),
        (
            "no appliance.xml",
            enspeed_tests::ova::zip(&zdir, &[("disk0.img", &disk, true)]),
        ),
        (
            "not in the zip",
            enspeed_tests::ova::zip(&zdir, &[("appliance.xml", x.as_bytes(), true)]),
        ),
    ] {
        let r = m.put_bytes("/api/v1/appliances/zip-bad", &z);
        assert!(r.0 == 422 && r.1.to_string().contains(why), "{why}: {r:?}");
    }

    // Deleted by a Manager only; once no appliance names the image, no server keeps it.
    assert_eq!(pw.send("DELETE", "/api/v1/appliances/again", None).0, 403);
    for name in [
        "app-qcow2",
        "app-vmdk",
        "app-raw",
        "again",
        "pvm-tpl",
        "from-dir",
        "zip-stored",
        "zip-deflated",
        "zip-dl",
    ] {
        let r = m.send("DELETE", &format!("/api/v1/appliances/{name}"), None);
        assert_eq!(r.0, 200, "{name}: {r:?}");
    }
    cluster::wait_for("no server keeps the image", WAIT, || {
        c.servers.iter().all(|s| !copy(s).exists()).then_some(())
    });
    assert_eq!(m.get("/api/v1/appliances").1, json!([]));
    // The VM made from it runs on: its disk is its own.
    assert_eq!(m.get(&format!("/api/v1/vms/{vm}")).0, 200);
}

/// The write number in test guest block `index` of `image` (its `stamp` layout: magic, index,
/// seq, a CRC-32 of the rest), `Some(0)` if the block is empty, None if torn.
fn guest_stamp(image: &[u8], index: usize) -> Option<u64> {
    let b = &image[index * 4096..(index + 1) * 4096];
    if b.iter().all(|x| *x == 0) {
        return Some(0);
    }
    let seq = u64::from_le_bytes(b[16..24].try_into().unwrap());
    let crc = u32::from_le_bytes(b[24..28].try_into().unwrap());
    let mut h = crc32fast::Hasher::new();
    h.update(&b[..24]);
    h.update(&b[28..]);
    let ok = &b[..8] == b"ENSPSTMP"
        && u64::from_le_bytes(b[8..16].try_into().unwrap()) == index as u64
        && h.finalize() == crc;
    ok.then_some(seq)
}

/// The last write the test guest acknowledged in serial log `log` (`tg: ack blk=B seq=S`), in
/// its whole lines: the guest may be writing the last one as it is read ("seq=9" of "seq=912").
fn last_ack(log: &str) -> u64 {
    let whole = log.rfind('\n').map_or("", |end| &log[..end]);
    whole
        .lines()
        .rev()
        .find_map(|l| l.split("seq=").nth(1).filter(|_| l.contains("tg: ack")))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_running_vm_is_backed_up_live_with_every_acknowledged_write_and_restored() {
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    // Its guest writes block seq % 64 for seq = 1, 2, ..., one at a time, and says each
    // acknowledged write on its serial console.
    let c = Cluster::start(
        "backup",
        &[
            "--guest-cmdline",
            "console=ttyS0 tg.run=stamp tg.blocks=64 tg.ops=0 tg.ackevery=1 tg.flushevery=0",
        ],
    );
    let m = c.manager(0);
    let r = m.send(
        "POST",
        "/api/v1/vms",
        Some(json!({"name": "busy", "memory_mib": 64, "disk_gib": 1, "start": true})),
    );
    let vm = id(&r);
    let path = format!("/api/v1/vms/{vm}");
    let refused = m.send(
        "POST",
        &format!("{path}/backup"),
        Some(json!({"name": "early"})),
    );
    assert!(
        refused.0 == 409 || refused.0 == 202,
        "before its backup is in sync, refused (or taken once it is): {refused:?}"
    );
    let v = cluster::wait_for(
        "the VM running, its disk in sync",
        Duration::from_secs(120),
        || {
            let v = m.get(&path).1;
            (v["status"] == "running" && v["replication"]["state"] == "in-sync").then_some(v)
        },
    );
    if refused.0 == 202 {
        cluster::wait_for("the early backup ends", WAIT, || {
            (m.get("/api/v1/tasks").1[0]["state"] != "running").then_some(())
        });
        m.send("DELETE", "/api/v1/appliances/early", None);
    }
    let primary = v["primary"]["server"].as_u64().unwrap() as usize - 1;
    let backup = v["backup"]["server"].as_u64().unwrap() as usize - 1;
    let serial = c.servers[primary].data.join("agent/vms/busy/serial.log");
    let log = || std::fs::read_to_string(&serial).unwrap_or_default();
    cluster::wait_for("the guest writing", WAIT, || {
        (last_ack(&log()) > 300).then_some(())
    });
    let before = last_ack(&log());
    let r = m.send(
        "POST",
        &format!("{path}/backup"),
        Some(json!({"name": "busy-bk", "description": "while it wrote"})),
    );
    assert_eq!(r.0, 202, "{r:?}");
    assert_eq!(
        (&r.1["kind"], &r.1["state"]),
        (&json!("backup"), &json!("running"))
    );
    let task = r.1["id"].clone();
    let done = cluster::wait_for("the backup ends", WAIT, || {
        let t = m.get("/api/v1/tasks").1;
        let t = t.as_array()?.iter().find(|t| t["id"] == task)?.clone();
        (t["state"] != "running").then_some(t)
    });
    assert_eq!(done["state"], "done", "{done}");
    let after = last_ack(&log());
    let a = m.get("/api/v1/appliances").1[0].clone();
    assert_eq!(
        (&a["name"], &a["description"]),
        (&json!("busy-bk"), &json!("while it wrote"))
    );
    assert!(a["origin"]
        .as_str()
        .unwrap()
        .starts_with("live backup of VM"));
    let sha = a["disks"][0]["sha256"].as_str().unwrap().to_string();
    assert_eq!(a["disks"][0]["size"], json!(1u64 << 30));
    // Made on the backup server, from its copy: every write acknowledged before the backup
    // began is in it, and it is the disk as it was at one point: the newest write found, k,
    // and before it, for every block, the newest write to that block.
    let image = enspeed_tests::read_head(
        &c.servers[backup]
            .data
            .join("isos")
            .join(format!("{sha}.raw")),
        64 * 4096,
    )
    .unwrap();
    let stamps: Vec<u64> = (0..64)
        .map(|b| guest_stamp(&image, b).unwrap_or_else(|| panic!("block {b} torn")))
        .collect();
    let k = *stamps.iter().max().unwrap();
    assert!(
        k >= before,
        "acknowledged before the backup: {before}, found up to {k}"
    );
    assert!(after > k, "the guest wrote on meanwhile: {after} after {k}");
    for (b, s) in stamps.iter().enumerate() {
        let want = k - (k - b as u64) % 64;
        assert_eq!(*s, want, "block {b}, the backup cut at {k}");
    }
    assert!(m.get(&path).1["status"] == "running", "the VM ran on");

    // Restored: a new VM made from the backup starts with the image's data.
    let r = m.send(
        "POST",
        "/api/v1/vms",
        Some(json!({"name": "restored", "appliance": "busy-bk"})),
    );
    assert_eq!(r.0, 201, "{r:?}");
    let rp = r.1["primary"]["server"].as_u64().unwrap() as usize - 1;
    let data = c.servers[rp].data.join("disks/restored-0/data");
    cluster::wait_for("the restored disk made", WAIT, || {
        let d = std::fs::File::open(&data).ok()?;
        let mut head = vec![0u8; 64 * 4096];
        std::os::unix::fs::FileExt::read_exact_at(&d, &mut head, 0).ok()?;
        (head == image[..64 * 4096]).then_some(())
    });
    let audit = m.get("/api/v1/audit").1.to_string();
    assert!(audit.contains("appliance.backup"), "{audit}");
}

/// An import whose server's process ends (a power cut of it) leaves its task running until that
/// server is back: its web service then fails the task with the reason, and the appliance is
/// never listed. Its disk is a qcow2 image, which the import converts after the last byte (with
/// qemu-img), so that the import is still running when the process is killed.
#[test]
fn an_import_cut_short_by_its_server_s_restart_is_failed_with_the_reason() {
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = Cluster::start("import-restart", &[]);
    let scratch = Scratch::new("import-restart");
    let dir = scratch.path("ova");
    std::fs::create_dir_all(&dir).unwrap();
    // 256 MiB that do not compress: a conversion of a second or more.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let raw: Vec<u8> = (0..256u64 << 17)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    let raw_path = dir.join("disk.raw");
    std::fs::write(&raw_path, &raw).unwrap();
    drop(raw);
    let ova = enspeed_tests::ova::one_disk("cut", &raw_path, "qcow2", &dir, false);
    let m = c.manager(0);
    let r = m.send(
        "POST",
        "/api/v1/uploads",
        Some(json!({"kind": "appliance", "name": "cut", "size": ova.len()})),
    );
    assert_eq!(r.0, 201, "{r:?}");
    let up = r.1["id"].as_str().unwrap().to_string();
    let r = m.upload_part(&up, 0, &ova);
    assert_eq!((r.0, &r.1["kind"]), (202, &json!("import")), "{r:?}");
    let task = r.1["id"].as_u64().unwrap();
    c.servers[0].kill9();
    // Seen from another server: still running while its server is away.
    let other = c.manager(1);
    let state = |m: &Web| {
        let t = m.get("/api/v1/tasks").1;
        t.as_array()?.iter().find(|t| t["id"] == task).cloned()
    };
    let t = cluster::wait_for("the import's task, seen from server 2", WAIT, || {
        state(&other)
    });
    assert_eq!(t["state"], "running", "{t}");
    c.servers[0].start(&[]);
    let t = cluster::wait_for("the import's task failed by its server", WAIT, || {
        state(&other).filter(|t| t["state"] != "running")
    });
    assert_eq!(t["state"], "failed", "{t}");
    let why = t["reason"].as_str().unwrap_or_default();
    assert!(why.contains("restarted during the import"), "{t}");
    let l = other.get("/api/v1/appliances").1;
    assert!(
        l.as_array().unwrap().iter().all(|a| a["name"] != "cut"),
        "never listed: {l}"
    );
}
