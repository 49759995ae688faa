//! Looks at a VM's graphical console through its RFB socket, for test-host
//! scenarios (where no VNC viewer exists): staged into the test host next
//! to `enspeed` and run against `enspeed vmm --vnc SOCKET`.
//!
//! ```text
//! rfb-probe SOCKET bar SECS     waits (polling) until the screen shows a solid non-black bar
//!                               of 16 text cells (128x16 pixels on the 8x16 cell grid), then
//!                               prints "RFB: bar at X,Y colour=RRGGBB text=N" (N: non-black
//!                               pixels outside the bar) and exits 0; else prints
//!                               "RFB: no bar ..." and exits 1
//! rfb-probe SOCKET type TEXT    types TEXT (printable ASCII) and Enter
//! rfb-probe SOCKET sizes        reads the whole screen Raw, then Zlib encoded, and prints
//!                               "RFB: full screen raw=N zlib=M bytes" (the same pixels, or
//!                               it fails)
//! rfb-probe SOCKET look SECS     prints the screen's size and a coarse picture of it (one
//!                               character a block, by brightness) every 15 s for SECS: what a
//!                               person would have seen, in a log
//! rfb-probe SOCKET installer SECS
//!                               waits up to SECS for a graphical installer's list screen (a
//!                               page with a list whose selected row is one coloured band,
//!                               unchanged for 5 s); presses Down and sees the band move down a
//!                               row, Up and sees it back; moves the pointer from one place to
//!                               another over the screen and sees the pixels change at both,
//!                               nothing else (the pointer, drawn there); prints "RFB: ..." for
//!                               each step and exits 0, or says which step failed and exits 1
//! ```

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use enspeed_tests::rfb::{keysym, PixelFormat, RfbClient};

/// Text cell of the kernel's 8x16 font.
const CELL_W: u16 = 8;
const CELL_H: u16 = 16;
/// The bar: this many cells wide, one high.
const BAR_CELLS: u16 = 16;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(socket), Some(cmd)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: rfb-probe SOCKET bar SECS | rfb-probe SOCKET type TEXT | rfb-probe SOCKET sizes");
        return ExitCode::from(2);
    };
    let result = match (cmd.as_str(), args.get(3)) {
        ("bar", Some(secs)) => match secs.parse::<u64>() {
            Ok(s) => bar(Path::new(socket), Duration::from_secs(s)),
            Err(_) => Err(format!("bar: {secs:?} is not a number of seconds")),
        },
        ("type", Some(text)) => type_line(Path::new(socket), text),
        ("sizes", None) => sizes(Path::new(socket)),
        ("installer", Some(secs)) => match secs.parse::<u64>() {
            Ok(s) => installer(Path::new(socket), Duration::from_secs(s)),
            Err(_) => Err(format!("installer: {secs:?} is not a number of seconds")),
        },
        ("look", Some(secs)) => match secs.parse::<u64>() {
            Ok(s) => look(Path::new(socket), Duration::from_secs(s)),
            Err(_) => Err(format!("look: {secs:?} is not a number of seconds")),
        },
        _ => Err(format!("unknown command {cmd:?}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("RFB: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Connects, waiting up to `wait` for the socket to appear.
fn connect(socket: &Path, wait: Duration) -> Result<RfbClient, String> {
    let deadline = Instant::now() + wait;
    loop {
        match RfbClient::connect(socket) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("cannot connect to {}: {e}", socket.display()))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

fn bar(socket: &Path, wait: Duration) -> Result<(), String> {
    let deadline = Instant::now() + wait;
    let mut c = connect(socket, wait)?;
    c.set_pixel_format(PixelFormat::XRGB32)
        .map_err(|e| e.to_string())?;
    println!("RFB: connected, {}x{} \"{}\"", c.width, c.height, c.name);
    let (w, h) = (c.width, c.height);
    c.request(false, 0, 0, w, h).map_err(|e| e.to_string())?;
    c.read_update().map_err(|e| e.to_string())?;
    loop {
        if let Some((x, y, colour)) = find_bar(&c) {
            let text = nonblack(&c) - usize::from(BAR_CELLS * CELL_W * CELL_H);
            println!(
                "RFB: bar at {x},{y} colour={:02x}{:02x}{:02x} text={text}",
                colour.0, colour.1, colour.2
            );
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no bar within {wait:?}; non-black pixels={}",
                nonblack(&c)
            ));
        }
        // Incremental: answered when something changed.
        c.request(true, 0, 0, w, h).map_err(|e| e.to_string())?;
        if c.pending(deadline.saturating_duration_since(Instant::now()))
            .map_err(|e| e.to_string())?
        {
            c.read_update().map_err(|e| e.to_string())?;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn nonblack(c: &RfbClient) -> usize {
    let mut n = 0;
    for y in 0..c.height {
        for x in 0..c.width {
            if c.pixel(x, y) != (0, 0, 0) {
                n += 1;
            }
        }
    }
    n
}

/// A solid non-black 16-cell bar on the cell grid: its pixel position and colour.
fn find_bar(c: &RfbClient) -> Option<(u16, u16, (u16, u16, u16))> {
    let bar_w = BAR_CELLS * CELL_W;
    for y in (0..c.height.saturating_sub(CELL_H - 1)).step_by(CELL_H.into()) {
        for x in (0..c.width.saturating_sub(bar_w - 1)).step_by(CELL_W.into()) {
            let colour = c.pixel(x, y);
            if colour == (0, 0, 0) {
                continue;
            }
            let solid =
                (y..y + CELL_H).all(|py| (x..x + bar_w).all(|px| c.pixel(px, py) == colour));
            if solid {
                return Some((x, y, colour));
            }
        }
    }
    None
}

/// The screen as text: 96 columns of blocks, each a character by its mean brightness.
fn picture(c: &RfbClient) -> String {
    const COLS: u32 = 96;
    const SHADES: &[u8] = b" .:-=+*#%@";
    let (w, h) = (u32::from(c.width), u32::from(c.height));
    let bw = w.div_ceil(COLS).max(1);
    let bh = (bw * 2).max(1);
    let mut out = String::new();
    for by in (0..h).step_by(bh as usize) {
        let mut line = String::new();
        for bx in (0..w).step_by(bw as usize) {
            let (mut sum, mut n) = (0u64, 0u64);
            for y in (by..(by + bh).min(h)).step_by(2) {
                for x in (bx..(bx + bw).min(w)).step_by(2) {
                    let (r, g, b) = c.pixel(x as u16, y as u16);
                    sum += u64::from(r) * 3 + u64::from(g) * 6 + u64::from(b);
                    n += 10;
                }
            }
            let mean = sum.checked_div(n).unwrap_or(0);
            let i = (mean * (SHADES.len() as u64 - 1) / 255) as usize;
            line.push(SHADES[i.min(SHADES.len() - 1)] as char);
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Connects (waiting up to `wait`) to watch the screen: 32-bit pixels, Raw, and the screen's
/// size as it changes (DesktopSize).
fn watcher(socket: &Path, wait: Duration) -> Result<RfbClient, String> {
    let mut c = connect(socket, wait)?;
    c.set_pixel_format(PixelFormat::XRGB32)
        .map_err(|e| e.to_string())?;
    c.set_encodings(&[0, -223]).map_err(|e| e.to_string())?;
    Ok(c)
}

fn look(socket: &Path, wait: Duration) -> Result<(), String> {
    let deadline = Instant::now() + wait;
    let mut c = watcher(socket, wait)?;
    loop {
        refresh(&mut c)?;
        println!(
            "RFB: the screen, {}x{}:\n{}",
            c.width,
            c.height,
            picture(&c)
        );
        if Instant::now() >= deadline {
            return Ok(());
        }
        drain(&mut c, Duration::from_secs(15))?;
    }
}

/// Reads whatever the server sends for `wait` (a new size comes with a whole screen, unasked:
/// a client that does not read it is closed).
fn drain(c: &mut RfbClient, wait: Duration) -> Result<(), String> {
    let until = Instant::now() + wait;
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        if c.pending(left.min(Duration::from_millis(500)))
            .map_err(|e| e.to_string())?
        {
            c.read_update().map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// Asks for the whole screen and reads it.
fn refresh(c: &mut RfbClient) -> Result<(), String> {
    let (w, h) = (c.width, c.height);
    c.request(false, 0, 0, w, h).map_err(|e| e.to_string())?;
    c.read_update().map_err(|e| e.to_string())?;
    // A new size comes first, alone: then the screen at that size.
    if (c.width, c.height) != (w, h) {
        c.request(false, 0, 0, c.width, c.height)
            .map_err(|e| e.to_string())?;
        c.read_update().map_err(|e| e.to_string())?;
    }
    Ok(())
}

type Band = (u16, u16, (u16, u16, u16));

/// Bands of rows in the middle of the screen (15% to 85% of its height) where one colour
/// covers at least 60% of the width between 10% and 90%, the rows of a band within a few
/// shades of its first: first row, last row, the first row's colour.
fn bands(c: &RfbClient) -> Vec<Band> {
    let (w, h) = (c.width, c.height);
    let (x0, x1) = (w / 10, w - w / 10);
    let row_colour = |y: u16| {
        let mut counts: std::collections::HashMap<(u16, u16, u16), u32> = Default::default();
        for x in (x0..x1).step_by(2) {
            *counts.entry(c.pixel(x, y)).or_default() += 1;
        }
        let (colour, n) = counts.into_iter().max_by_key(|&(_, n)| n)?;
        (n * 2 * 10 >= u32::from(x1 - x0) * 6).then_some(colour)
    };
    let mut out = Vec::new();
    let mut y = h * 15 / 100;
    while y < h * 85 / 100 {
        match row_colour(y) {
            Some(colour) => {
                // A band may be drawn as a gradient: rows of nearly the same colour belong to it.
                let near = |o: (u16, u16, u16)| {
                    colour.0.abs_diff(o.0) <= 24
                        && colour.1.abs_diff(o.1) <= 24
                        && colour.2.abs_diff(o.2) <= 24
                };
                let start = y;
                while y < h && row_colour(y).is_some_and(near) {
                    y += 1;
                }
                out.push((start, y - 1, colour));
            }
            None => y += 1,
        }
    }
    out
}

/// A list's selected row: a band 8 to 64 pixels high of a colour neither pale (a page's
/// background: white, or GTK's light grey) nor near black.
fn selection(c: &RfbClient) -> Option<Band> {
    if c.width < 640 || c.height < 480 {
        return None;
    }
    bands(c).into_iter().find(|&(y0, y1, (r, g, b))| {
        let pale = r.min(g).min(b) > 200;
        let dark = r.max(g).max(b) < 25;
        (8..=64).contains(&(y1 - y0 + 1)) && !pale && !dark
    })
}

fn describe(bands: &[Band]) -> String {
    bands
        .iter()
        .map(|(y0, y1, (r, g, b))| format!("{y0}..{y1} {r:02x}{g:02x}{b:02x}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Pixels that differ between two screens of the same size: how many, and their bounding box.
fn differences(a: &[(u16, u16, u16)], b: &RfbClient) -> (usize, Option<(u16, u16, u16, u16)>) {
    let (mut n, mut bbox) = (0, None::<(u16, u16, u16, u16)>);
    for y in 0..b.height {
        for x in 0..b.width {
            if a[usize::from(y) * usize::from(b.width) + usize::from(x)] != b.pixel(x, y) {
                n += 1;
                bbox = Some(match bbox {
                    None => (x, y, x, y),
                    Some((l, t, r, btm)) => (l.min(x), t.min(y), r.max(x), btm.max(y)),
                });
            }
        }
    }
    (n, bbox)
}

fn pixels(c: &RfbClient) -> Vec<(u16, u16, u16)> {
    (0..c.height)
        .flat_map(|y| (0..c.width).map(move |x| (x, y)))
        .map(|(x, y)| c.pixel(x, y))
        .collect()
}

/// Waits up to `limit` for `done` on a fresh screen, draining what the server sends.
fn until(
    c: &mut RfbClient,
    limit: Duration,
    mut done: impl FnMut(&RfbClient) -> bool,
) -> Result<bool, String> {
    let end = Instant::now() + limit;
    loop {
        refresh(c)?;
        if done(c) {
            return Ok(true);
        }
        if Instant::now() >= end {
            return Ok(false);
        }
        drain(c, Duration::from_secs(1))?;
    }
}

fn installer(socket: &Path, wait: Duration) -> Result<(), String> {
    let deadline = Instant::now() + wait;
    let mut c = watcher(socket, wait)?;
    // The list screen, settled: the same selected row 5 s apart.
    let first = loop {
        refresh(&mut c)?;
        if let Some(sel) = selection(&c) {
            drain(&mut c, Duration::from_secs(5))?;
            refresh(&mut c)?;
            if selection(&c) == Some(sel) {
                break sel;
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no installer list within {wait:?}; the screen, {}x{} (bands {}):\n{}",
                c.width,
                c.height,
                describe(&bands(&c)),
                picture(&c)
            ));
        }
        println!(
            "RFB: waiting for the installer's list: {}x{}, bands {}",
            c.width,
            c.height,
            describe(&bands(&c))
        );
        drain(&mut c, Duration::from_secs(10))?;
    };
    println!(
        "RFB: the installer's list, {}x{}, its selected row at y={}..{} colour={:02x}{:02x}{:02x}:\n{}",
        c.width,
        c.height,
        first.0,
        first.1,
        first.2 .0,
        first.2 .1,
        first.2 .2,
        picture(&c)
    );
    // Keys: Down moves the selection a row down, Up brings it back.
    c.tap(keysym::DOWN).map_err(|e| e.to_string())?;
    let mut down = None;
    let moved = until(&mut c, Duration::from_secs(30), |c| {
        down = selection(c).filter(|s| s.0 > first.0);
        down.is_some()
    })?;
    let Some(down) = down.filter(|_| moved) else {
        return Err(format!(
            "Down did not move the selection; the screen:\n{}",
            picture(&c)
        ));
    };
    c.tap(keysym::UP).map_err(|e| e.to_string())?;
    let back = until(&mut c, Duration::from_secs(30), |c| {
        selection(c).map(|s| s.0) == Some(first.0)
    })?;
    if !back {
        return Err(format!(
            "Up did not bring the selection back to y={}; the screen:\n{}",
            first.0,
            picture(&c)
        ));
    }
    println!(
        "RFB: Down moved the selection to y={}..{}, Up back to y={}",
        down.0, down.1, first.0
    );
    // The pointer: over the banner at the top, from its left to its right part. The screen
    // changes where it was and where it is now, and nowhere else.
    let (w, h) = (c.width, c.height);
    let (a, b) = ((w / 5, h / 20), (w * 4 / 5, h / 20));
    c.pointer(a.0, a.1, 0).map_err(|e| e.to_string())?;
    drain(&mut c, Duration::from_secs(3))?;
    refresh(&mut c)?;
    let before = pixels(&c);
    c.pointer(b.0, b.1, 0).map_err(|e| e.to_string())?;
    let mut seen = (0, None);
    until(&mut c, Duration::from_secs(30), |c| {
        seen = differences(&before, c);
        seen.0 > 0
    })?;
    let (n, Some(bbox)) = seen else {
        return Err("moving the pointer changed nothing on the screen".into());
    };
    // On both halves of the screen (where it was and where it went), and little else.
    let spans = bbox.2 - bbox.0 > (b.0 - a.0) / 2;
    if !spans || n > usize::from(w) * usize::from(h) / 50 {
        return Err(format!(
            "the pointer's move changed {n} pixels in {bbox:?}: not a pointer going from {a:?} to {b:?}"
        ));
    }
    let mut ends = (false, false);
    for y in bbox.1..=bbox.3 {
        for x in bbox.0..=bbox.2 {
            if before[usize::from(y) * usize::from(w) + usize::from(x)] != c.pixel(x, y) {
                ends.0 |= x < w / 2;
                ends.1 |= x >= w / 2;
            }
        }
    }
    if !(ends.0 && ends.1) {
        return Err(format!(
            "the pointer's move changed {n} pixels in {bbox:?}, not at both places"
        ));
    }
    println!("RFB: the pointer moved from {a:?} to {b:?}: {n} pixels changed, in {bbox:?}");
    Ok(())
}

/// One full update of the screen with `encodings`: the client (holding the
/// screen) and the update's size in bytes.
fn full_screen(socket: &Path, encodings: &[i32]) -> Result<(RfbClient, u64), String> {
    let mut c = connect(socket, Duration::from_secs(10))?;
    c.set_encodings(encodings).map_err(|e| e.to_string())?;
    let (w, h) = (c.width, c.height);
    c.request(false, 0, 0, w, h).map_err(|e| e.to_string())?;
    c.read_update().map_err(|e| e.to_string())?;
    let bytes = c.update_bytes;
    Ok((c, bytes))
}

fn sizes(socket: &Path) -> Result<(), String> {
    let (raw, raw_bytes) = full_screen(socket, &[0])?;
    let (zlib, zlib_bytes) = full_screen(socket, &[6, 0])?;
    // The screen may change between the two: compare only if both show the same.
    let same = (0..raw.height).all(|y| (0..raw.width).all(|x| raw.pixel(x, y) == zlib.pixel(x, y)));
    println!(
        "RFB: full screen raw={raw_bytes} zlib={zlib_bytes} bytes{}",
        if same {
            ""
        } else {
            " (the screen changed between them)"
        }
    );
    Ok(())
}

fn type_line(socket: &Path, text: &str) -> Result<(), String> {
    let mut c = connect(socket, Duration::from_secs(10))?;
    let mut n = 0;
    for ch in text.chars() {
        if !(' '..='~').contains(&ch) {
            return Err(format!("cannot type {ch:?}: printable ASCII only"));
        }
        // Capitals and shifted symbols as a person types them: with Shift held.
        let shifted = ch.is_ascii_uppercase() || "~!@#$%^&*()_+{}|:\"<>?".contains(ch);
        if shifted {
            c.key(keysym::SHIFT_L, true).map_err(|e| e.to_string())?;
        }
        c.tap(u32::from(ch)).map_err(|e| e.to_string())?;
        if shifted {
            c.key(keysym::SHIFT_L, false).map_err(|e| e.to_string())?;
        }
        n += 1;
    }
    c.tap(keysym::RETURN).map_err(|e| e.to_string())?;
    // Closing at once is fine: the server has read the events before it
    // notices the end of the stream.
    println!("RFB: typed {n} characters and Enter");
    Ok(())
}
