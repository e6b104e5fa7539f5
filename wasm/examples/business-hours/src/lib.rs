//! Example extension: mail to listed domains is held (deferred) outside business hours.
//!
//! # Core concepts
//!
//! The plugin configuration lists the domains (address patterns) and the hours:
//!
//! ```json
//! {"domains": ["bank.example", "*.bank.example"],
//!  "open_hour": 9, "close_hour": 17, "utc_offset_minutes": 60, "days": [1, 2, 3, 4, 5]}
//! ```
//!
//! `open_hour` (inclusive) and `close_hour` (exclusive) are local hours, 0–24, at
//! `utc_offset_minutes` from UTC; `days` are local weekdays (0 = Sunday), all by default.
//! The clock is the host's (`proxy_get_current_time_nanoseconds`). Outside hours a
//! delivering decision becomes `defer` with `451 4.7.0`; the queue retries later.
//! Refusals are never changed.

use proxy_wasm::types::LogLevel;
use serde::Deserialize;

use altroute_policy::pattern::Pattern;
use altroute_policy::sdk;
use altroute_policy::{Decision, Query, Route};

/// The rule this extension names in the decisions it makes.
pub const RULE: &str = "extension:business-hours";

/// The plugin configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Recipient domains (or addresses) held outside hours.
    pub domains: Vec<Pattern>,
    /// First local hour of business (inclusive). Defaults to 9.
    #[serde(default = "nine")]
    pub open_hour: u32,
    /// End of business, local hour (exclusive). Defaults to 17.
    #[serde(default = "seventeen")]
    pub close_hour: u32,
    /// Offset of local time from UTC, minutes. Defaults to 0.
    #[serde(default)]
    pub utc_offset_minutes: i32,
    /// Local weekdays of business, 0 = Sunday. Defaults to every day.
    #[serde(default = "every_day")]
    pub days: Vec<u32>,
}

fn nine() -> u32 {
    9
}
fn seventeen() -> u32 {
    17
}
fn every_day() -> Vec<u32> {
    (0..7).collect()
}

impl Config {
    /// Parses and checks the configuration.
    pub fn parse(text: &[u8]) -> Result<Config, String> {
        let c: Config = serde_json::from_slice(text).map_err(|e| e.to_string())?;
        if c.open_hour >= c.close_hour || c.close_hour > 24 {
            return Err("open_hour must be less than close_hour, both within 0..=24".into());
        }
        if c.utc_offset_minutes.abs() > 24 * 60 {
            return Err("utc_offset_minutes: within -1440..=1440".into());
        }
        if c.days.iter().any(|d| *d > 6) {
            return Err("days: 0 (Sunday) to 6 (Saturday)".into());
        }
        Ok(c)
    }

    /// Whether `unix_secs` is within business hours.
    pub fn open_at(&self, unix_secs: u64) -> bool {
        let local =
            i64::try_from(unix_secs).unwrap_or(i64::MAX) + i64::from(self.utc_offset_minutes) * 60;
        let days = local.div_euclid(86_400);
        let hour = u32::try_from(local.rem_euclid(86_400) / 3600).unwrap_or(0);
        // 1970-01-01 was a Thursday (4).
        let weekday = u32::try_from((days + 4).rem_euclid(7)).unwrap_or(0);
        self.days.contains(&weekday) && hour >= self.open_hour && hour < self.close_hour
    }

    /// The decision at `unix_secs` for mail to `recipient`; `None` keeps `d`.
    pub fn decide(&self, recipient: &str, unix_secs: u64, mut d: Decision) -> Option<Decision> {
        if !self.domains.iter().any(|p| p.matches(recipient)) || self.open_at(unix_secs) {
            return None;
        }
        if !matches!(d.route, Route::Direct | Route::Host | Route::Alternate) {
            return None;
        }
        d.route = Route::Defer;
        d.rule = RULE.to_string();
        d.reason = format!(
            "held outside business hours ({:02}:00-{:02}:00, UTC{:+})",
            self.open_hour,
            self.close_hour,
            f64::from(self.utc_offset_minutes) / 60.0
        );
        d.reply = Some("451 4.7.0 Held until business hours, will retry".into());
        Some(d)
    }
}

impl sdk::Extension for Config {
    const NAME: &'static str = "business-hours";

    fn configure(config: &[u8]) -> Result<Self, String> {
        Config::parse(config)
    }

    fn decide(&self, q: &Query, d: Decision) -> Option<Decision> {
        let Some(now) = sdk::now_unix_secs() else {
            // No clock: the hours cannot be told; leave the decision as it is.
            sdk::log(LogLevel::Warn, "business-hours: the host has no clock");
            return None;
        };
        Config::decide(self, &q.recipient, now, d)
    }
}

proxy_wasm::main! {{
    sdk::register::<Config>();
}}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn hours_and_days() {
        let c = Config::parse(br#"{"domains":["bank.example"],"open_hour":9,"close_hour":17,"utc_offset_minutes":60,"days":[1,2,3,4,5]}"#).unwrap();
        // 2025-11-25 (a Tuesday) 08:30 UTC = 09:30 local: open.
        let tue = 1_764_059_400;
        assert!(c.open_at(tue));
        // 16:30 UTC = 17:30 local: closed.
        assert!(!c.open_at(tue + 8 * 3600));
        // Saturday 2025-11-29 09:30 local: closed.
        assert!(!c.open_at(tue + 4 * 86_400));
        assert!(Config::parse(br#"{"domains":[],"open_hour":17,"close_hour":9}"#).is_err());
    }
}
