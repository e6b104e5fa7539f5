//! The DSN extension's parameters (RFC 3461): what the sender of a message asked to be
//! told, and what it goes on to the next hop with. The server takes them from MAIL
//! (`RET`, `ENVID`) and RCPT (`NOTIFY`, `ORCPT`); the client writes them to a next hop
//! that offers DSN and drops them for one that does not (the relay then reports
//! `relayed` itself where `NOTIFY=SUCCESS` asked for it).

use serde::{Deserialize, Serialize};

/// `RET=`: what a delivery status notification returns of the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ret {
    /// The whole message.
    Full,
    /// Its header section only.
    Hdrs,
}

impl Ret {
    /// The parameter's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Ret::Full => "FULL",
            Ret::Hdrs => "HDRS",
        }
    }
}

/// `NOTIFY=` of one recipient. All false: the parameter was not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Notify {
    pub never: bool,
    pub success: bool,
    pub failure: bool,
    pub delay: bool,
}

impl Notify {
    /// Whether the parameter was given.
    pub fn given(self) -> bool {
        self.never || self.success || self.failure || self.delay
    }

    /// Whether a failure is reported: asked for, or `NOTIFY` not given (RFC 3461 §4.1:
    /// then failures are reported).
    pub fn on_failure(self) -> bool {
        !self.never && (self.failure || !self.given())
    }

    /// Whether a successful delivery (or relay to a next hop without DSN) is reported.
    pub fn on_success(self) -> bool {
        self.success
    }

    /// The parameter's value (`SUCCESS,FAILURE`), or `None` when it was not given.
    pub fn to_param(self) -> Option<String> {
        if self.never {
            return Some("NEVER".to_string());
        }
        let words: Vec<&str> = [
            (self.success, "SUCCESS"),
            (self.failure, "FAILURE"),
            (self.delay, "DELAY"),
        ]
        .into_iter()
        .filter_map(|(on, w)| on.then_some(w))
        .collect();
        (!words.is_empty()).then(|| words.join(","))
    }

    /// From smtp-proto's RCPT flags; `None` when `NEVER` comes with another keyword
    /// (RFC 3461 §4.1: NEVER stands alone).
    pub(crate) fn from_flags(flags: u64) -> Option<Notify> {
        let n = Notify {
            never: flags & smtp_proto::RCPT_NOTIFY_NEVER != 0,
            success: flags & smtp_proto::RCPT_NOTIFY_SUCCESS != 0,
            failure: flags & smtp_proto::RCPT_NOTIFY_FAILURE != 0,
            delay: flags & smtp_proto::RCPT_NOTIFY_DELAY != 0,
        };
        (!(n.never && (n.success || n.failure || n.delay))).then_some(n)
    }
}

/// The DSN parameters of one recipient.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RcptDsn {
    pub notify: Notify,
    /// `ORCPT=rfc822;…`, xtext-decoded: the address the sender first wrote.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub orcpt: Option<String>,
}

impl RcptDsn {
    /// Whether anything was given.
    pub fn is_empty(&self) -> bool {
        !self.notify.given() && self.orcpt.is_none()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn notify_defaults_and_params() {
        let none = Notify::default();
        assert!(none.on_failure() && !none.on_success() && none.to_param().is_none());
        let never = Notify::from_flags(smtp_proto::RCPT_NOTIFY_NEVER).unwrap();
        assert!(!never.on_failure() && !never.on_success());
        assert_eq!(never.to_param().as_deref(), Some("NEVER"));
        let both =
            Notify::from_flags(smtp_proto::RCPT_NOTIFY_SUCCESS | smtp_proto::RCPT_NOTIFY_DELAY)
                .unwrap();
        assert!(!both.on_failure() && both.on_success());
        assert_eq!(both.to_param().as_deref(), Some("SUCCESS,DELAY"));
        assert!(
            Notify::from_flags(smtp_proto::RCPT_NOTIFY_NEVER | smtp_proto::RCPT_NOTIFY_SUCCESS)
                .is_none()
        );
    }
}
