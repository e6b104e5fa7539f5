//! Shared helpers for the end-to-end tests.

pub mod envoy;

/// A proxy-wasm HTTP module in WAT text, for the benches' floor modules: the functions
/// `imports` declares, `data` at offset 1024, a bump `malloc` reset for each context, the
/// given extra `globals`, and the bodies of `proxy_on_configure` (which then returns 1) and
/// `proxy_on_request_headers` (which may use a local `$count` and then returns 0). The
/// other callbacks return at once.
pub fn http_wat_module(
    imports: &str,
    data: &[u8],
    globals: &str,
    configure: &str,
    headers: &str,
) -> String {
    let escaped: String = data.iter().map(|b| format!("\\{b:02x}")).collect();
    format!(
        r#"(module
  {imports}
  (memory (export "memory") 4)
  (data (i32.const 1024) "{escaped}")
  (global $heap (mut i32) (i32.const 65536))
  {globals}
  ;; A bump allocator, reset for each context.
  (func (export "malloc") (param $n i32) (result i32) (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_context_create") (param i32 i32) (global.set $heap (i32.const 65536)))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    {configure}
    (i32.const 1))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_log") (param i32))
  (func (export "proxy_on_delete") (param i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (local $count i32)
    {headers}
    (i32.const 0)))"#
    )
}
