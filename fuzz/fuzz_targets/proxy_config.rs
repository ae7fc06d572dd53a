//! The proxy configuration loader (`conduit_proxy::config::ProxyConfig::load`), on the
//! environment and the YAML file an operator writes.
//!
//! The input is text: `NAME=VALUE` environment lines, then optionally a line `%%` and the
//! file. Never panics, and the two carriers share one schema: the environment alone gives
//! the same result as a file holding the same keys (`CONDUIT_PROXY_CONNECT_TIMEOUT=2s` means
//! what `connect_timeout: 2s` means, a number being a number in both).
#![no_main]

use conduit_proxy::config::{ENV_PREFIX, ProxyConfig};
use libfuzzer_sys::fuzz_target;
use serde_yaml_ng::{Mapping, Value};

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let (env_text, file) = match text.split_once("\n%%\n") {
        Some((env, file)) => (env, Some(file)),
        None => (text, None),
    };
    let env: Vec<(String, String)> = env_text
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect();
    let loaded = ProxyConfig::load(file, env.clone());
    if file.is_some() {
        return;
    }

    // The same keys as a file: what `load` documents for the environment.
    let mut map = Mapping::new();
    for (name, value) in env {
        let Some(key) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if key == "CONFIG" {
            continue;
        }
        let value = match value.parse::<u64>() {
            Ok(n) => Value::Number(n.into()),
            Err(_) => Value::String(value),
        };
        map.insert(Value::String(key.to_ascii_lowercase()), value);
    }
    let file = serde_yaml_ng::to_string(&map).expect("a mapping serializes");
    let from_file = ProxyConfig::load(Some(&file), Vec::new());
    match (&loaded, &from_file) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "file:\n{file}"),
        (Err(_), Err(_)) => {}
        _ => panic!("environment: {loaded:?}\nfile:\n{file}\ngave: {from_file:?}"),
    }
});
