//! EnSpeed's control plane: the cluster's state in a Raft group (raft-rs) persisted in RocksDB.
//!
//! - `storage`: raft-rs `Storage` over RocksDB, with the applied state machine beside the log;
//! - `state_machine`: the typed commands and the cluster records they change;
//! - `node`: the thread that drives raft-rs and applies committed entries;
//! - `transport`: Raft messages between servers over TCP;
//! - `api`: the JSON-lines client protocol, forwarded to the leader;
//! - `console`: a VM's serial and graphical consoles relayed from its VMM to another server;
//! - `agent`: the node agent, which runs blockd and the VMMs as the state says and fences
//!   the server when it loses the quorum;
//! - `access`: users, sessions, what each role may do, the audit log;
//! - `library`: the ISO images' files, uploaded to one server and copied to the others;
//! - `placement`: which servers hold a VM's disk copies;
//! - `failover`: the leader's failure detector, which declares servers down;
//! - `livemove`: a running VM's live migration between servers, relayed over mutual TLS;
//! - `server`: `enspeed server`, which puts them together.

pub mod access;
pub mod agent;
pub mod api;
pub mod cli;
pub mod console;
pub mod copyback;
pub mod download;
pub mod failover;
pub mod library;
pub mod livemove;
pub mod netdev;
pub mod node;
pub mod ova;
pub mod peers;
pub mod placement;
mod raft_log;
pub mod server;
pub mod state_machine;
pub mod storage;
pub mod transport;
pub mod vmdk;
pub mod vmnet;
pub mod zipped;

pub use node::{NodeConfig, NodeError, Status};
pub use server::{Bootstrap, ServerConfig};
pub use state_machine::{Capacity, Command, Query, ServerRecord};
