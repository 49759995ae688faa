//! `enspeed`: one binary, a subcommand per process role.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use vmm::config::{
    parse_disk, parse_net, parse_serial, DiskConfig, NetConfig, SerialTarget, VmConfig,
};

#[derive(Parser)]
#[command(name = "enspeed", version, about = "EnSpeed virtualization appliance")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one virtual machine (one process per VM). Exits 0 when the guest powers off.
    Vmm(VmmArgs),
    /// Send one request to a VMM's control socket and print the answer; exits 1 if refused.
    /// Example: enspeed vmm-api --socket /run/vm.sock '{"cmd":"shutdown","timeout_secs":30}'
    VmmApi {
        /// The VMM's --api-socket.
        #[arg(long)]
        socket: PathBuf,
        /// The request, one JSON object.
        request: String,
    },
}

#[derive(Args)]
struct VmmArgs {
    /// Kernel image: a bzImage, or an ELF (PVH entry if it has one, else 64-bit entry).
    #[arg(long)]
    kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line; the VMM appends `virtio_mmio.device=` entries for its devices.
    #[arg(long, default_value = "console=ttyS0")]
    cmdline: String,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// A disk: PATH[,readonly]. Repeat for more; read-only disks are removable media.
    #[arg(long = "disk", value_parser = parse_disk)]
    disks: Vec<DiskConfig>,
    /// A network card: tap=NAME[,mac=MAC]. Repeat for more.
    #[arg(long = "net", value_parser = parse_net)]
    nets: Vec<NetConfig>,
    /// Serial console: stdout, or a file to append to.
    #[arg(long, default_value = "stdout", value_parser = parse_serial)]
    serial: SerialTarget,
    /// Control socket (JSON lines): status, pause, resume, shutdown, stop, ctrl-alt-del, media, serial.
    #[arg(long)]
    api_socket: Option<PathBuf>,
}

/// Sends `request` on the control socket; returns the answer line and its `ok`.
fn vmm_api(socket: &std::path::Path, request: &str) -> std::io::Result<(String, bool)> {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.write_all(request.trim().as_bytes())?;
    s.write_all(b"\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    let ok = line.contains("\"ok\":true");
    Ok((line.trim_end().to_string(), ok))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ENSPEED_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::VmmApi { socket, request } => match vmm_api(&socket, &request) {
            Ok((answer, ok)) => {
                println!("{answer}");
                if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("enspeed vmm-api: {}: {e}", socket.display());
                ExitCode::FAILURE
            }
        },
        Command::Vmm(a) => {
            let cfg = VmConfig {
                kernel: a.kernel,
                initrd: a.initrd,
                cmdline: a.cmdline,
                memory_mib: a.memory,
                vcpus: a.vcpus,
                disks: a.disks,
                nets: a.nets,
                serial: a.serial,
                api_socket: a.api_socket,
            };
            match vmm::vm::run(cfg) {
                Ok(exit) => {
                    tracing::info!(?exit, "VM ended");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("enspeed vmm: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
