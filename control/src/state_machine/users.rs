//! Users and their sessions: created, given a password or a quota, deleted; sessions opened
//! at login (the oldest ending beyond `access::MAX_SESSIONS`) and closed at logout.

use serde_json::{json, Value};

use super::keys::{json_bytes, session_key, user_key, COUNTERS_KEY};
use super::rights::Actor;
use super::{Acted, Action, RecordWrite, Refusal, StateMachine};
use crate::access::{self, Role, UserRecord};

impl StateMachine {
    /// The user named `name`.
    pub fn user_by_name(&self, name: &str) -> Option<&UserRecord> {
        self.users.values().find(|u| u.name == name)
    }

    /// Applies an action on users or sessions for `by` (`act` routes them here).
    pub(super) fn act_on_user(
        &mut self,
        by: &Actor,
        action: &Action,
        writes: &mut Vec<RecordWrite>,
    ) -> Result<Acted<'static>, Refusal> {
        let (verb, target, result) = match action {
            Action::CreateUser {
                name,
                role,
                password,
                parent,
                quota,
            } => {
                access::check_name("user", name)?;
                if self.user_by_name(name).is_some() {
                    return Err(Refusal::conflict(format!("user {name} exists")));
                }
                // A Power User creates Regular Users under itself, and nothing else.
                let parent = match &by.who {
                    Some(u) if u.role == Role::PowerUser => {
                        if *role != Role::Regular || parent.is_some_and(|p| p != u.id) {
                            return Err(access::refuse(
                                "a Power User creates Regular Users under itself",
                            ));
                        }
                        Some(u.id)
                    }
                    Some(u) if u.role == Role::Regular => {
                        return Err(access::refuse("a Regular User creates no users"));
                    }
                    _ => *parent,
                };
                if let Some(p) = parent {
                    if *role != Role::Regular {
                        return Err(Refusal::conflict(
                            "only a Regular User has a Power User above it",
                        ));
                    }
                    if self.users.get(&p).is_none_or(|u| u.role != Role::PowerUser) {
                        return Err(Refusal::conflict(format!("user {p} is not a Power User")));
                    }
                }
                let quota = match (role, &by.who) {
                    (Role::PowerUser, Some(u)) if u.role != Role::Manager => None,
                    (Role::PowerUser, _) => Some(quota.unwrap_or_default()),
                    _ => None,
                };
                if password.is_empty() {
                    return Err(Refusal::conflict("a user needs a password"));
                }
                self.counters.user += 1;
                let u = UserRecord {
                    id: self.counters.user,
                    name: name.clone(),
                    role: *role,
                    parent,
                    password: password.clone(),
                    quota,
                    created_ms: by.at_ms,
                };
                writes.push((COUNTERS_KEY.to_vec(), Some(json_bytes(&self.counters))));
                writes.push((user_key(u.id), Some(json_bytes(&u))));
                let target = format!("user {} ({})", u.id, u.name);
                let id = u.id;
                self.users.insert(id, u);
                ("user.create", target, json!({ "id": id }))
            }
            Action::SetPassword {
                user,
                password,
                keep_session,
            } => {
                let target = self
                    .users
                    .get(user)
                    .cloned()
                    .ok_or_else(|| Refusal::not_found(format!("no user {user}")))?;
                if let Some(u) = &by.who {
                    if u.id != *user && !access::may_manage_user(u, &target) {
                        return Err(access::refuse(format!("user {user}")));
                    }
                }
                if password.is_empty() {
                    return Err(Refusal::conflict("a user needs a password"));
                }
                let u = self.users.get_mut(user).expect("checked");
                u.password = password.clone();
                writes.push((user_key(*user), Some(json_bytes(u))));
                for hash in access::sessions_of(&self.sessions, *user) {
                    if keep_session.as_ref() != Some(&hash) {
                        self.sessions.remove(&hash);
                        writes.push((session_key(&hash), None));
                    }
                }
                (
                    "user.password",
                    format!("user {user} ({})", target.name),
                    Value::Null,
                )
            }
            Action::SetQuota { user, quota } => {
                if !by.is_manager() {
                    return Err(access::refuse("only a Manager sets quotas"));
                }
                let u = self
                    .users
                    .get_mut(user)
                    .ok_or_else(|| Refusal::not_found(format!("no user {user}")))?;
                if u.role != Role::PowerUser {
                    return Err(Refusal::conflict(format!(
                        "user {user} is not a Power User"
                    )));
                }
                u.quota = Some(*quota);
                writes.push((user_key(*user), Some(json_bytes(u))));
                (
                    "user.quota",
                    format!("user {user} ({})", u.name),
                    Value::Null,
                )
            }
            Action::DeleteUser { user } => {
                let target = self
                    .users
                    .get(user)
                    .cloned()
                    .ok_or_else(|| Refusal::not_found(format!("no user {user}")))?;
                if let Some(u) = &by.who {
                    if u.id == *user {
                        return Err(Refusal::conflict("a user cannot delete itself"));
                    }
                    if !access::may_manage_user(u, &target) {
                        return Err(access::refuse(format!("user {user}")));
                    }
                }
                if let Some(vm) = self.vms.values().find(|vm| vm.owner == Some(*user)) {
                    return Err(Refusal::conflict(format!(
                        "user {} owns VM {} ({}): delete it first",
                        target.name, vm.id, vm.name
                    )));
                }
                if self.users.values().any(|u| u.parent == Some(*user)) {
                    return Err(Refusal::conflict(format!(
                        "user {} has users under it: delete them first",
                        target.name
                    )));
                }
                if target.role == Role::Manager
                    && self
                        .users
                        .values()
                        .filter(|u| u.role == Role::Manager)
                        .count()
                        == 1
                {
                    return Err(Refusal::conflict("the last Manager cannot be deleted"));
                }
                self.users.remove(user);
                writes.push((user_key(*user), None));
                for hash in access::sessions_of(&self.sessions, *user) {
                    self.sessions.remove(&hash);
                    writes.push((session_key(&hash), None));
                }
                (
                    "user.delete",
                    format!("user {user} ({})", target.name),
                    Value::Null,
                )
            }
            Action::Login { session } => {
                if by.who.as_ref().is_none_or(|u| u.id != session.user) {
                    return Err(access::refuse("a session is opened by its own user"));
                }
                // Sessions that ran out go as new ones come.
                let expired: Vec<String> = self
                    .sessions
                    .values()
                    .filter(|s| s.expires_ms <= by.at_ms)
                    .map(|s| s.token_hash.clone())
                    .collect();
                for hash in expired {
                    self.sessions.remove(&hash);
                    writes.push((session_key(&hash), None));
                }
                // A user keeps at most `access::MAX_SESSIONS`: the oldest ones end first.
                let mut mine: Vec<(u64, String)> = self
                    .sessions
                    .values()
                    .filter(|s| s.user == session.user)
                    .map(|s| (s.created_ms, s.token_hash.clone()))
                    .collect();
                mine.sort();
                let over = (mine.len() + 1).saturating_sub(access::MAX_SESSIONS);
                for (_, hash) in mine.into_iter().take(over) {
                    self.sessions.remove(&hash);
                    writes.push((session_key(&hash), None));
                }
                writes.push((session_key(&session.token_hash), Some(json_bytes(session))));
                self.sessions
                    .insert(session.token_hash.clone(), session.clone());
                (
                    "session.login",
                    format!("user {}", session.user),
                    Value::Null,
                )
            }
            Action::Logout { token_hash } => {
                let s = self
                    .sessions
                    .get(token_hash)
                    .ok_or_else(|| Refusal::not_found("no such session"))?;
                if by.who.as_ref().is_some_and(|u| u.id != s.user) {
                    return Err(access::refuse("another user's session"));
                }
                let user = s.user;
                self.sessions.remove(token_hash);
                writes.push((session_key(token_hash), None));
                ("session.logout", format!("user {user}"), Value::Null)
            }
            _ => unreachable!("act routes no other action here: {action:?}"),
        };
        Ok(Acted::Changed {
            verb,
            target,
            result,
        })
    }
}
