//! What the fuzz targets share: the cluster they start from.

use control::state_machine::{Capacity, ServerRecord, StateMachine};

/// Server `id`: a witness, or a VM server with room for many VMs.
pub fn server(id: u64, witness: bool) -> ServerRecord {
    ServerRecord {
        id,
        address: format!("127.0.0.1:{}", 7000 + id),
        witness,
        capacity: if witness {
            Capacity::default()
        } else {
            Capacity {
                memory_mib: 64 << 10,
                disk_gib: 1 << 10,
                vcpus: 64,
                pools: Vec::new(),
            }
        },
        mirror: format!("127.0.0.1:{}", 7100 + id),
        down: false,
        draining: false,
        cert: String::new(),
    }
}

/// A new cluster's first server (one that holds VMs): its state and the records it is stored
/// as. `add_server` then adds the others.
pub fn first_server() -> (StateMachine, Vec<(Vec<u8>, Vec<u8>)>) {
    let first = StateMachine::initial_records(&server(1, false));
    let sm = StateMachine::load(&first).expect("a new cluster's records load");
    (sm, first)
}
