//! Action `tick`, for live migration: the guest counts, keeps rewriting a memory region page
//! by page and checks each page still holds what it wrote there the pass before, and measures
//! the longest stall between two steps (a pause for migration shows as one).
//!
//! Every 100 ms it prints `tg: tick n=N maxgap-us=G` (N the count of steps so far, G the
//! longest gap between two steps since the last line, microseconds of TSC time); a page that
//! lost what was written is `tg: FAIL tick page P holds X, wrote Y`. Parameters: `tg.tickmib`
//! (the region, default 4 MiB at 32 MiB), `tg.tickpages` (pages a step, default 16, one step a
//! millisecond: the rate the guest dirties memory), `tg.tickms` (how long, default 60 s).

use crate::io::{rd32, rdtsc, wr32, Deadline};
use crate::{fail, say};

const REGION: u64 = 32 << 20;
const PAGE: u64 = 4096;

/// What pass `pass` writes in page `p`: different for every page and pass.
fn pattern(pass: u32, p: u64) -> u32 {
    (pass.wrapping_mul(0x9e37_79b9)) ^ (p as u32).wrapping_mul(0x85eb_ca6b) ^ 0x5bd1_e995
}

pub fn act_tick() {
    let pages = crate::cmdline::num("tg.tickmib", 4) * (1 << 20) / PAGE;
    let per_step = crate::cmdline::num("tg.tickpages", 16).max(1);
    let end = Deadline::after_ms(crate::cmdline::num("tg.tickms", 60_000));
    let hz = *crate::io::TSC_HZ.get();
    let us = |ticks: u64| ticks as u128 * 1_000_000 / hz.max(1) as u128;
    let step_ticks = hz / 1000;
    let print_ticks = hz / 10;
    // Pass 0 first, whole: every page then holds a known value.
    for p in 0..pages {
        wr32(REGION + p * PAGE, pattern(0, p));
    }
    say!("tick ready pages={} per-step={}", pages, per_step);
    let (mut pass, mut page) = (1u32, 0u64);
    let mut n = 0u64;
    let mut last = rdtsc();
    let mut next_print = last + print_ticks;
    let mut max_gap = 0u64;
    while !end.expired() {
        for _ in 0..per_step {
            let at = REGION + page * PAGE;
            let held = rd32(at);
            let want = pattern(pass - 1, page);
            if held != want {
                fail!("tick page {} holds {:x}, wrote {:x}", page, held, want);
                return;
            }
            wr32(at, pattern(pass, page));
            page += 1;
            if page == pages {
                page = 0;
                pass += 1;
            }
        }
        n += 1;
        let now = rdtsc();
        max_gap = max_gap.max(now.saturating_sub(last));
        if now >= next_print {
            say!("tick n={} maxgap-us={}", n, us(max_gap));
            max_gap = 0;
            next_print = now + print_ticks;
        }
        // One step a millisecond.
        let due = last + step_ticks;
        while rdtsc() < due {
            core::hint::spin_loop();
        }
        last = rdtsc();
    }
    say!("tick done n={}", n);
}

/// Action `fill`: writes `tg.fillmib` MiB (default 64) from the tick region's start once, a
/// word in every page, none of them zero: memory a live migration must carry (pages never
/// touched it may skip). Prints `tg: fill pages=N`.
pub fn act_fill() {
    let pages = crate::cmdline::num("tg.fillmib", 64) * (1 << 20) / PAGE;
    for p in 0..pages {
        wr32(REGION + p * PAGE, pattern(u32::MAX, p) | 1);
    }
    say!("fill pages={}", pages);
}
