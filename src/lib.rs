//! odissey: a multi-threaded PostgreSQL connection pooler and request router.
//!
//! Embed it through the blocking [`Handle`]:
//!
//! ```no_run
//! let handle = odissey::start(odissey::ConfigSource::File("odissey.toml".into()))?;
//! println!("{:?}", handle.inspect()?.tcp);
//! handle.shutdown(std::time::Duration::from_secs(30))?;
//! # Ok::<(), odissey::Error>(())
//! ```
//!
//! See DESIGN.md for the threads, the modules and the path of a query.

mod auth;
mod backend_login;
mod cmd;
pub mod config;
mod console;
mod credentials;
mod hosts;
mod ids;
mod io;
pub mod logging;
mod metrics;
mod notify;
mod params;
mod pool_shared;
mod prepared;
mod ratelimit;
mod relay;
mod resolver;
mod router;
mod session;
mod stats;
mod system;
mod tls;
mod worker;

pub use odissey_facade as facade;
pub use odissey_facade::{
    ConfigSource, Error, Handle, HostStats, Inspection, Reply, Request, RouteStats, Started,
};

/// Spawns the system thread, idle until [`Handle::start`].
pub fn spawn() -> Result<Handle, Error> {
    system::spawn_system().map_err(|e| Error::Io(e.to_string()))
}

/// Spawns the pooler and starts it from `config`.
pub fn start(config: ConfigSource) -> Result<Handle, Error> {
    let handle = spawn()?;
    handle.start(config)?;
    Ok(handle)
}
