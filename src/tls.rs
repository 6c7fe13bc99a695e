//! TLS material for listeners and storages: the config's PEM files turned
//! into rustls configurations, outside the reactors (reading files and
//! parsing keys must not stall a worker). Built at start and again on each
//! reload; a listener or storage whose new files don't load keeps what it
//! had, and the reload says why.

use std::collections::HashMap;
use std::path::PathBuf;

use odissey_transport::{
    ClientAuth, ClientTls, ClientTlsOptions, Protocols, ServerTls, ServerTlsOptions, Verify,
};

use crate::config::{Config, Listen, ListenTls, Storage, StorageTls};

/// A listener's TLS: how strict, and the configuration to serve it with.
#[derive(Debug, Clone)]
pub(crate) struct ListenerTls {
    pub(crate) mode: ListenTls,
    pub(crate) server: ServerTls,
}

/// A storage's TLS: how to ask, and the configuration to connect with.
#[derive(Debug, Clone)]
pub(crate) struct StorageTlsConfig {
    pub(crate) mode: StorageTls,
    pub(crate) client: ClientTls,
}

/// Every TLS configuration of one config, shared by all workers.
#[derive(Debug, Clone, Default)]
pub(crate) struct TlsSet {
    /// By listener, in `[[listen]]` order (None: TLS disabled).
    pub(crate) listen: Vec<Option<ListenerTls>>,
    /// By storage name (absent: TLS disabled).
    pub(crate) storage: HashMap<String, StorageTlsConfig>,
}

impl TlsSet {
    /// Loads what `cfg` names. Where a file does not load, the matching
    /// entry of `old` (the running set, on reload) is kept; each failure is
    /// described in the second value.
    pub(crate) fn load(cfg: &Config, old: Option<&Self>) -> (Self, Vec<String>) {
        let mut set = Self::default();
        let mut errors = Vec::new();
        for (i, l) in cfg.listen.iter().enumerate() {
            let got = match listener_tls(l) {
                Ok(t) => t,
                Err(e) => {
                    errors.push(format!("listen[{i}]: {e}"));
                    old.and_then(|o| o.listen.get(i).cloned()).flatten()
                }
            };
            set.listen.push(got);
        }
        for (name, st) in &cfg.storage {
            match storage_tls(st) {
                Ok(Some(t)) => {
                    set.storage.insert(name.clone(), t);
                }
                Ok(None) => {}
                Err(e) => {
                    errors.push(format!("storage.{name}: {e}"));
                    if let Some(t) = old.and_then(|o| o.storage.get(name)) {
                        set.storage.insert(name.clone(), t.clone());
                    }
                }
            }
        }
        (set, errors)
    }
}

/// The TLS of one `[[listen]]`, None when disabled.
pub(crate) fn listener_tls(l: &Listen) -> Result<Option<ListenerTls>, String> {
    if l.tls == ListenTls::Disable {
        return Ok(None);
    }
    let (Some(cert), Some(key)) = (&l.tls_cert_file, &l.tls_key_file) else {
        return Err("tls needs tls_cert_file and tls_key_file".into());
    };
    let client_auth = match (l.tls, &l.tls_ca_file) {
        (ListenTls::VerifyCa | ListenTls::VerifyFull, None) => {
            return Err(format!("tls = {:?} needs tls_ca_file", l.tls));
        }
        (ListenTls::VerifyCa | ListenTls::VerifyFull, Some(_)) => ClientAuth::Required,
        // With a CA, clients may present a certificate (for `cert` routes).
        (_, Some(_)) => ClientAuth::Optional,
        (_, None) => ClientAuth::None,
    };
    let protocols = protocols(l.tls_protocols.as_deref())?;
    let server = ServerTls::new(&ServerTlsOptions {
        cert_file: PathBuf::from(cert),
        key_file: PathBuf::from(key),
        ca_file: l.tls_ca_file.as_ref().map(PathBuf::from),
        client_auth,
        protocols,
    })
    .map_err(|e| e.to_string())?;
    Ok(Some(ListenerTls {
        mode: l.tls,
        server,
    }))
}

/// The TLS of one storage, None when disabled.
pub(crate) fn storage_tls(st: &Storage) -> Result<Option<StorageTlsConfig>, String> {
    let verify = match st.tls {
        StorageTls::Disable => return Ok(None),
        StorageTls::Allow | StorageTls::Prefer | StorageTls::Require => Verify::None,
        StorageTls::VerifyCa | StorageTls::VerifyFull if st.tls_ca_file.is_none() => {
            return Err(format!("tls = {:?} needs tls_ca_file", st.tls));
        }
        StorageTls::VerifyCa => Verify::Ca,
        StorageTls::VerifyFull => Verify::Full,
    };
    let client = ClientTls::new(&ClientTlsOptions {
        verify,
        ca_file: st.tls_ca_file.as_ref().map(PathBuf::from),
        cert_file: st.tls_cert_file.as_ref().map(PathBuf::from),
        key_file: st.tls_key_file.as_ref().map(PathBuf::from),
        protocols: protocols(st.tls_protocols.as_deref())?,
    })
    .map_err(|e| e.to_string())?;
    Ok(Some(StorageTlsConfig {
        mode: st.tls,
        client,
    }))
}

fn protocols(s: Option<&str>) -> Result<Protocols, String> {
    Protocols::parse(s.unwrap_or("")).map_err(|e| format!("tls_protocols: {e}"))
}
