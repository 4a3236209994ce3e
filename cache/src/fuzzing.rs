//! Entry points for the fuzz targets in `fuzz/` into parsers that are not public: what a
//! memcached server answers. Not an API. (Redis replies are parsed by redis-rs.)

/// Parses `bytes` as memcached's answer to a `get`, and as a ferry head item.
pub fn memcached_reply(bytes: &[u8]) {
    let _ = crate::memcached::read_value(&mut &bytes[..], "ferry:v1:k", 1 << 20);
    let _ = crate::memcached::parse_head(bytes);
}
