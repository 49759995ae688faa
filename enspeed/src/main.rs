//! `enspeed`: one binary, a subcommand per process role.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use vmm::config::{
    parse_boot_order, parse_cdrom, parse_disk, parse_firmware, parse_framebuffer, parse_net,
    parse_serial, Boot, BootOrder, CdromMedia, DiskConfig, Firmware, NetConfig, SerialTarget,
    VmConfig, VncConfig,
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
    /// Run the server's replicated disks (LiveSync): mirror links, resync, vhost-user-blk.
    Blockd(BlockdArgs),
    /// Manage the replicated disks of a blockd (create, attach a backup, status, promote, demote).
    Disk(DiskArgs),
    /// Certificates for blockds run on their own, outside a cluster (a server makes its own:
    /// the cluster's CA with --init, its certificate when it joins).
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Run this server's member of the control plane (Raft over RocksDB): start a cluster with
    /// --init, join one with --join ADDR, or restart from --data.
    Server(ServerCmd),
    /// Talk to the control plane through any server: status, put, get, state, add/remove server.
    Cluster(control::cli::ClusterArgs),
    /// VMs through the API of any server: list, show, create, start, stop, delete, clone,
    /// migrate, cdrom.
    Vm {
        #[command(flatten)]
        login: webui::cli::Login,
        #[command(subcommand)]
        command: webui::cli::VmCommand,
    },
    /// Users through the API: list, create, passwd, delete.
    User {
        #[command(flatten)]
        login: webui::cli::Login,
        #[command(subcommand)]
        command: webui::cli::UserCommand,
    },
    /// The networks, through the API: list; create or delete (Managers).
    Network {
        #[command(flatten)]
        login: webui::cli::Login,
        #[command(subcommand)]
        command: webui::cli::NetworkCommand,
    },
    /// The ISO library, through the API: list; upload or delete (Managers).
    Iso {
        #[command(flatten)]
        login: webui::cli::Login,
        #[command(subcommand)]
        command: webui::cli::IsoCommand,
    },
    /// The Virtual Appliance library, through the API: list; import, export, change or delete
    /// (Managers); copy a VM back into one.
    Appliance {
        #[command(flatten)]
        login: webui::cli::Login,
        #[command(subcommand)]
        command: webui::cli::ApplianceCommand,
    },
    /// Long operations (copy back), through the API: list; cancel one.
    Task {
        #[command(flatten)]
        login: webui::cli::Login,
        #[command(subcommand)]
        command: webui::cli::TaskCommand,
    },
    /// The cluster's servers, through the API (Managers); drain or remove one.
    Servers {
        #[command(flatten)]
        login: webui::cli::Login,
        #[command(subcommand)]
        command: Option<webui::cli::ServerCommand>,
    },
    /// The audit log, through the API (Managers).
    Audit {
        #[command(flatten)]
        login: webui::cli::Login,
        /// Entries after this seq.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u64,
    },
    /// Install EnSpeed on this machine's disk: the appliance ISO's installer. Asks on the
    /// console, or nothing when a filesystem labelled ENSPEED holds enspeed-install.toml.
    Install(InstallArgs),
}

#[derive(Args)]
struct InstallArgs {
    /// An answer file to use (default: enspeed-install.toml on the ENSPEED filesystem, if any).
    #[arg(long)]
    answers: Option<PathBuf>,
    /// The system to copy onto the disk.
    #[arg(long, default_value = "/run/live/medium/live/filesystem.squashfs")]
    squashfs: PathBuf,
    /// Where the new system is mounted while installing.
    #[arg(long, default_value = "/run/enspeed-target")]
    target: PathBuf,
    /// Return at the end instead of powering off or rebooting.
    #[arg(long)]
    no_finish: bool,
}

#[derive(Args)]
struct ServerCmd {
    #[command(flatten)]
    server: control::cli::ServerArgs,
    #[command(flatten)]
    web: webui::WebArgs,
}

#[derive(Args)]
struct BlockdArgs {
    /// Data directory: one folder per disk.
    #[arg(long)]
    dir: PathBuf,
    /// Mirror address to listen on for primaries, host:port.
    #[arg(long)]
    listen: String,
    /// Control socket.
    #[arg(long)]
    control: PathBuf,
    /// A mirror link is declared down after this long without traffic.
    #[arg(long, default_value_t = 2000)]
    link_timeout_ms: u64,
    /// The server's certificate directory (its DATA/tls): mirror links are mutual TLS under
    /// the cluster's CA.
    #[arg(long, value_name = "DIR", required_unless_present = "plaintext_mirror")]
    tls: Option<PathBuf>,
    /// Mirror links over plain TCP, no peer authenticated: for measuring what TLS costs only.
    #[arg(long, conflicts_with = "tls")]
    plaintext_mirror: bool,
}

#[derive(Subcommand)]
enum CertsCommand {
    /// A new CA and server ID's certificate under it, in DIR (as `enspeed server --init`
    /// makes in DATA/tls).
    Init {
        /// The directory.
        dir: PathBuf,
        /// The server's id.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
    },
    /// Server ID's certificate under the CA in --ca (a directory made by `init`), into DIR.
    Issue {
        /// The directory of the CA.
        #[arg(long)]
        ca: PathBuf,
        /// The server's id.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
        /// Where its certificate goes.
        dir: PathBuf,
    },
}

fn certs_command(c: CertsCommand) -> ExitCode {
    use enspeed_trust::TrustDir;
    let done = match c {
        CertsCommand::Init { dir, id } => TrustDir(dir).create_cluster(id),
        CertsCommand::Issue { ca, id, dir } => TrustDir(ca)
            .enroll(id)
            .and_then(|e| TrustDir(dir).install(&e)),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("enspeed certs: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Args)]
struct DiskArgs {
    /// The blockd's control socket.
    #[arg(long)]
    control: PathBuf,
    /// Print the answer as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    op: blockrepl::daemon::Request,
}

/// One line per disk, as `enspeed disk status` prints it.
fn disk_line(d: &blockrepl::replica::Status) -> String {
    let mut line = format!(
        "{}  {} gen {}  data {}  link {}  out-of-sync {} B",
        d.name, d.role, d.generation, d.data, d.link, d.out_of_sync_bytes
    );
    if let Some(p) = &d.peer {
        line += &format!("  peer {p}");
    }
    if let Some(r) = &d.resync {
        line += &format!(
            "  resync{} {:.1}% ({} B left, {:.1} MB/s)",
            if r.full { " (full)" } else { "" },
            r.percent,
            r.bytes_left,
            r.rate_bytes_per_sec as f64 / 1e6
        );
    }
    if d.stalled_writes > 0 {
        line += &format!("  stalled writes {}", d.stalled_writes);
    }
    if let Some(e) = &d.last_error {
        line += &format!("  last error: {e}");
    }
    line
}

fn disk_command(a: DiskArgs) -> ExitCode {
    match blockrepl::daemon::call(&a.control, &a.op) {
        Ok(resp) if resp.ok => {
            match resp.disks {
                Some(disks) if a.json => println!(
                    "{}",
                    serde_json::to_string_pretty(&disks).expect("JSON prints")
                ),
                Some(disks) => disks.iter().for_each(|d| println!("{}", disk_line(d))),
                None => println!("ok"),
            }
            ExitCode::SUCCESS
        }
        Ok(resp) => {
            eprintln!("enspeed disk: {}", resp.error.unwrap_or_default());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("enspeed disk: {}: {e}", a.control.display());
            ExitCode::FAILURE
        }
    }
}

#[derive(Args)]
struct VmmArgs {
    /// Kernel image for direct boot: a bzImage, or an ELF (PVH entry if it has one, else 64-bit
    /// entry); its devices are virtio-mmio. Without it the VM starts in its firmware and boots
    /// from its disks, in order, with its devices on PCI.
    #[arg(long, conflicts_with = "firmware")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk (with --kernel).
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line (with --kernel); the VMM appends `virtio_mmio.device=` entries for
    /// its devices.
    #[arg(long, default_value = "console=ttyS0")]
    cmdline: String,
    /// Firmware when there is no --kernel: bios (SeaBIOS, the default) or uefi.
    #[arg(long, value_parser = parse_firmware)]
    firmware: Option<Firmware>,
    /// The firmware image, when not the one Debian's package installs
    /// (/usr/share/seabios/bios-256k.bin).
    #[arg(long, conflicts_with = "kernel")]
    firmware_image: Option<PathBuf>,
    /// A SATA CD-ROM drive (firmware boot) with this ISO image in it, or `empty`; its media
    /// is changed on the control socket as the drive after the disks.
    #[arg(long, value_parser = parse_cdrom, conflicts_with = "kernel")]
    cdrom: Option<CdromMedia>,
    /// What the firmware boots first: disk,cdrom (the default) or cdrom,disk.
    #[arg(long, value_parser = parse_boot_order, conflicts_with = "kernel")]
    boot: Option<BootOrder>,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// A disk: PATH[,readonly][,bus=virtio|sata] (served by the VMM from a file; read-only
    /// virtio disks are removable media; SATA disks need firmware boot), or
    /// vhost-user=SOCKET[,bus=virtio|sata] (served by a vhost-user-blk backend such as
    /// `enspeed blockd`, which decides whether it is read-only). Repeat for more.
    #[arg(long = "disk", value_parser = parse_disk)]
    disks: Vec<DiskConfig>,
    /// A network card: tap=NAME[,mac=MAC]. Repeat for more.
    #[arg(long = "net", value_parser = parse_net)]
    nets: Vec<NetConfig>,
    /// Serial console: stdout, or a file to append to.
    #[arg(long, default_value = "stdout", value_parser = parse_serial)]
    serial: SerialTarget,
    /// The most a serial log FILE keeps, KiB: FILE and FILE.1 hold the newest output.
    #[arg(long, default_value_t = vmm::config::SERIAL_MAX >> 10, value_parser = clap::value_parser!(u64).range(4..))]
    serial_max_kib: u64,
    /// Control socket (JSON lines): status, pause, resume, shutdown, stop, ctrl-alt-del, media,
    /// serial, migrate.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Do not boot: wait on this unix socket (owner-only) for a VMM of the same configuration
    /// to migrate its running VM here (its `migrate` request), then run it.
    #[arg(long)]
    incoming: Option<PathBuf>,
    /// Graphical console: a framebuffer for the guest (Linux finds it through boot_params, vesafb)
    /// and an RFB (VNC) server on this unix socket, no authentication, owner-only access.
    #[arg(long)]
    vnc: Option<PathBuf>,
    /// Framebuffer size WIDTHxHEIGHT, 32 bits a pixel (with --vnc).
    #[arg(long, default_value = "1024x768", value_parser = parse_framebuffer, requires = "vnc")]
    framebuffer: (u32, u32),
    /// The VM's name, as its console shows it.
    #[arg(long, default_value = "enspeed")]
    name: String,
}

/// Sends `request` on the control socket; returns the answer line and its `ok`.
/// Sends one request (JSON text, checked against the protocol first) to a VMM's control
/// socket; the answer as JSON text.
fn vmm_api(socket: &std::path::Path, request: &str) -> Result<String, String> {
    let req: vmm_api::Request =
        serde_json::from_str(request.trim()).map_err(|e| format!("not a VMM request: {e}"))?;
    let answer = vmm_api::call(socket, &req, std::time::Duration::from_secs(30))
        .map_err(|e| e.to_string())?;
    serde_json::to_string(&answer).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ENSPEED_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Server(a) => match a.web.service() {
            Ok(web) => control::cli::server_with(a.server, web.into_iter().collect()),
            Err(e) => {
                eprintln!("enspeed server: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Cluster(a) => control::cli::cluster(a),
        Command::Vm { login, command } => webui::cli::vm(&login, command),
        Command::User { login, command } => webui::cli::user(&login, command),
        Command::Servers { login, command } => webui::cli::servers(&login, command),
        Command::Iso { login, command } => webui::cli::iso(&login, command),
        Command::Appliance { login, command } => webui::cli::appliance(&login, command),
        Command::Task { login, command } => webui::cli::task(&login, command),
        Command::Network { login, command } => webui::cli::network(&login, command),
        Command::Audit {
            login,
            after,
            limit,
        } => webui::cli::audit(&login, after, limit),
        Command::Install(a) => installer::main(installer::Options {
            answers: a.answers,
            squashfs: a.squashfs,
            target: a.target,
            finish: !a.no_finish,
        }),
        Command::Blockd(a) => {
            let net = match &a.tls {
                Some(dir) => match blockrepl::net::MirrorNet::tls(dir) {
                    Ok(n) => n,
                    Err(e) => {
                        eprintln!("enspeed blockd: --tls {}: {e}", dir.display());
                        return ExitCode::FAILURE;
                    }
                },
                None => {
                    tracing::warn!("mirror links over plain TCP: no peer is authenticated (--plaintext-mirror)");
                    blockrepl::net::MirrorNet::Plain
                }
            };
            let cfg = blockrepl::daemon::Config {
                net,
                dir: a.dir,
                listen: a.listen,
                control: a.control,
                timing: blockrepl::replica::Timing {
                    link_timeout: std::time::Duration::from_millis(a.link_timeout_ms.max(100)),
                    ping_interval: std::time::Duration::from_millis(a.link_timeout_ms.max(100) / 5),
                    ..Default::default()
                },
            };
            match blockrepl::daemon::Blockd::open(cfg).and_then(|b| b.run()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("enspeed blockd: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Disk(a) => disk_command(a),
        Command::Certs(c) => certs_command(c),
        Command::VmmApi { socket, request } => match vmm_api(&socket, &request) {
            Ok(answer) => {
                println!("{answer}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("enspeed vmm-api: {}: {e}", socket.display());
                ExitCode::FAILURE
            }
        },
        Command::Vmm(a) => {
            let boot = match a.kernel {
                Some(kernel) => Boot::Kernel {
                    kernel,
                    initrd: a.initrd,
                    cmdline: a.cmdline,
                },
                None => Boot::Firmware {
                    firmware: a.firmware.unwrap_or(Firmware::Bios),
                    image: a.firmware_image,
                    cdrom: a.cdrom.map(CdromMedia::into_path),
                    order: a.boot.unwrap_or(BootOrder::DiskFirst),
                },
            };
            let cfg = VmConfig {
                name: a.name,
                boot,
                memory_mib: a.memory,
                vcpus: a.vcpus,
                disks: a.disks,
                nets: a.nets,
                serial: a.serial,
                serial_max: a.serial_max_kib << 10,
                api_socket: a.api_socket,
                incoming: a.incoming,
                vnc: a.vnc.map(|socket| VncConfig {
                    socket,
                    width: a.framebuffer.0,
                    height: a.framebuffer.1,
                }),
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
