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
