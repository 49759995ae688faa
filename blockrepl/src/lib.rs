//! LiveSync: a virtual disk mirrored synchronously between a primary and a
//! backup server, served to the VMM over vhost-user-blk.
//!
//! - [`store`]: what the vhost-user-blk backend serves, a [`store::BlockStore`]:
//!   a plain file or a [`replica::Replica`];
//! - [`meta`] and [`bitmap`]: a copy's durable metadata (roles, generations)
//!   and its bitmap of changed regions;
//! - [`proto`]: the mirror protocol's frames;
//! - [`replica`]: one copy and its write path; [`link`] and [`resync`]: the
//!   primary's side of the mirror; [`backup`]: the backup's side;
//! - [`snapshot`]: point-in-time images of backup copies taken while they go on (live backup);
//! - [`vhost_blk`]: the vhost-user-blk backend that serves a store to a VMM;
//! - [`daemon`]: `enspeed blockd`, the server's disks and their control socket;
//! - [`net`]: the mirror links' connections, mutual TLS between the cluster's servers.

pub mod backup;
pub mod bitmap;
pub mod clone;
pub mod daemon;

pub mod link;
pub mod meta;
pub mod net;
pub mod proto;
pub mod replica;
pub mod resync;
pub mod snapshot;
pub mod store;
pub mod vhost_blk;
