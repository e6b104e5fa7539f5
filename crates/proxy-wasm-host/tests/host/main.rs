//! Integration tests of the proxy-wasm host: the SDK test guest, hostile modules written
//! in WAT, and hot swaps under load. One binary, a module per topic.
#![allow(clippy::unwrap_used)]

mod guest;
mod hostile;
mod swap;

use std::sync::Arc;

use proxy_wasm_host::{Host, HostConfig, HttpRequest, Plugin, PluginSpec};

pub fn host() -> Host {
    Host::new(HostConfig {
        warm_instances: 2,
        ..HostConfig::default()
    })
    .unwrap()
}

pub fn testguest(host: &Host, config: &str) -> Arc<Plugin> {
    host.load(
        PluginSpec::new(altroute_modules::TESTGUEST, "testguest.http")
            .name("testguest")
            .plugin_config(config)
            .version(config),
    )
    .unwrap()
}

pub fn request(headers: &[(&str, &str)]) -> HttpRequest {
    HttpRequest {
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect(),
        ..HttpRequest::default()
    }
}

/// Asserts that `plugin` (the test guest) answers a plain request correctly.
pub fn assert_serves(plugin: &Plugin) {
    let out = plugin
        .http_request(&request(&[(":path", "/ok"), (":method", "GET")]))
        .unwrap();
    assert_eq!(out.header("x-tg-config"), Some(plugin.version().as_bytes()));
    assert_eq!(out.header("x-tg-path"), Some(&b"/ok"[..]));
}
