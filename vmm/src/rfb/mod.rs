//! The VM's graphical console over RFB (VNC): the guest's framebuffer out,
//! keys in. Served on a unix socket that the local web server proxies to
//! a browser's noVNC.

pub mod keysym;
pub mod server;
pub mod update;
pub mod wire;

pub use server::serve;
