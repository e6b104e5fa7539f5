//! Which patterns of a policy match an address, found by binary search.
//!
//! A decision asks which compliance rule, which static route and which org unit match the
//! recipient and the sender. Matching every pattern made a decision linear in the policy:
//! about 100 µs for a pair of questions against 10,000 domains (BENCHMARKS.md, decision
//! latency). The patterns are sorted once per policy, by org unit, kind and text, so each
//! question looks up the address, its domain and each parent domain, whatever the
//! policy's size. The callers then pick among the few matches exactly as a scan of every
//! pattern in order would (`decide.rs`); a property test compares the two on random
//! policies.

use std::cmp::Ordering;
use std::ops::Range;

use crate::pattern::{Canonical, Pattern, base_mailbox};
use crate::policy::{Policy, Rule};
use crate::types::Direction;

/// The kind of a pattern: the order of the ranges of a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Address,
    Domain,
    Subdomains,
}

/// One pattern of a rule, a route or an org unit's senders.
#[derive(Debug)]
pub(crate) struct Entry {
    /// The pattern's text without `*.`, ASCII lower-cased (patterns match
    /// case-insensitively).
    key: Box<str>,
    /// The rule, route or org unit (its place in the policy's list)...
    pub(crate) owner: usize,
    /// ...and the pattern's place in its list of patterns.
    pub(crate) pattern: usize,
}

/// The patterns of one kind of owner (rules, routes or org units), grouped by org unit.
#[derive(Debug)]
pub(crate) struct Table {
    /// Each org unit with patterns, sorted by path (see [`cmp_unit`]), and where its
    /// patterns of each kind are in `entries`.
    units: Vec<(Box<str>, [Range<usize>; 3])>,
    /// Sorted by org unit, kind, then key (shorter keys first, see [`cmp_lower`]).
    entries: Vec<Entry>,
    /// The policy's recipient delimiter: address patterns also match the address without
    /// its extension ([`base_mailbox`]).
    delimiter: Box<str>,
}

impl Table {
    /// `items`: (org unit, owner, pattern's place, pattern) for every pattern.
    fn build<'p>(
        delimiter: &str,
        items: impl Iterator<Item = (&'p str, usize, usize, &'p Pattern)>,
    ) -> Table {
        let mut sorted: Vec<(&str, Kind, Entry)> = items
            .map(|(unit, owner, at, p)| {
                let (kind, text) = match p {
                    Pattern::Address(a) => (Kind::Address, a),
                    Pattern::Domain(d) => (Kind::Domain, d),
                    Pattern::Subdomains(d) => (Kind::Subdomains, d),
                };
                let entry = Entry {
                    key: text.to_ascii_lowercase().into_boxed_str(),
                    owner,
                    pattern: at,
                };
                (unit, kind, entry)
            })
            .collect();
        sorted.sort_by(|a, b| {
            cmp_unit(a.0, b.0)
                .then(a.1.cmp(&b.1))
                .then(cmp_lower(&a.2.key, &b.2.key))
        });
        let mut units = Vec::new();
        let mut start = 0;
        while let Some((unit, _, _)) = sorted.get(start) {
            let len = sorted[start..].partition_point(|(u, _, _)| u == unit);
            let group = &sorted[start..start + len];
            let domains = start + group.partition_point(|(_, k, _)| *k < Kind::Domain);
            let subdomains = start + group.partition_point(|(_, k, _)| *k < Kind::Subdomains);
            units.push((
                Box::<str>::from(*unit),
                [start..domains, domains..subdomains, subdomains..start + len],
            ));
            start += len;
        }
        Table {
            units,
            entries: sorted.into_iter().map(|(_, _, e)| e).collect(),
            delimiter: delimiter.into(),
        }
    }

    /// Calls `found` with every pattern of org unit `unit` that matches `address` (as
    /// [`Pattern::matches_mailbox`] does with the policy's delimiter), in no particular
    /// order.
    pub(crate) fn matching<'t>(
        &'t self,
        unit: &str,
        address: &Canonical<'_>,
        mut found: impl FnMut(&'t Entry),
    ) {
        let Ok(u) = self.units.binary_search_by(|(u, _)| cmp_unit(u, unit)) else {
            return;
        };
        let (address, domain) = (address.address(), address.domain());
        let [addresses, domains, subdomains] = self.units[u].1.clone();
        let mut each = |range: Range<usize>, needle: &str| {
            if !range.is_empty() {
                equal(&self.entries[range], needle)
                    .iter()
                    .for_each(&mut found);
            }
        };
        if !addresses.is_empty() {
            if let Some(base) = base_mailbox(address, domain, &self.delimiter) {
                // A more specific pattern for the whole address wins (it is longer).
                each(addresses.clone(), &base);
            }
            each(addresses, address);
        }
        each(domains, domain);
        if subdomains.is_empty() {
            return;
        }
        // `*.d` matches a domain that ends in `.d` with something before the dot: the
        // part after each dot but a leading one.
        for (i, b) in domain.bytes().enumerate().skip(1) {
            if b == b'.' {
                // `.` is ASCII: the byte after it starts a char.
                each(subdomains.clone(), &domain[i + 1..]);
            }
        }
    }
}

/// The entries of `sorted` (sorted by [`cmp_lower`]) whose key is `needle`, compared ASCII
/// case-insensitively (keys are lower-cased).
fn equal<'e>(sorted: &'e [Entry], needle: &str) -> &'e [Entry] {
    // Few entries (a unit's addresses, say): one pass comparing lengths costs less than
    // the two searches.
    if sorted.len() <= SHORT {
        let same = |e: &Entry| e.key.len() == needle.len() && e.key.eq_ignore_ascii_case(needle);
        let Some(start) = sorted.iter().position(same) else {
            return &[];
        };
        let len = sorted[start..].iter().take_while(|e| same(e)).count();
        return &sorted[start..start + len];
    }
    let start = sorted.partition_point(|e| cmp_lower(&e.key, needle) == Ordering::Less);
    let rest = &sorted[start..];
    let len = rest.partition_point(|e| cmp_lower(&e.key, needle) == Ordering::Equal);
    &rest[..len]
}

/// Up to this many entries, [`equal`] looks at each one.
const SHORT: usize = 8;

/// Org unit paths by length, then byte by byte: a search among a few short paths settles
/// on the length or the first bytes, without the call to `memcmp` that comparing `str`s
/// makes (which was a quarter of a decision).
fn cmp_unit(a: &str, b: &str) -> Ordering {
    a.len().cmp(&b.len()).then_with(|| a.bytes().cmp(b.bytes()))
}

/// `key` (lower-case) against `needle` lower-cased, without lower-casing a copy: by length
/// first, which settles most comparisons of a search without reading the text.
fn cmp_lower(key: &str, needle: &str) -> Ordering {
    key.len().cmp(&needle.len()).then_with(|| {
        key.bytes()
            .cmp(needle.bytes().map(|b| b.to_ascii_lowercase()))
    })
}

/// The pattern tables of a policy. Part of [`Policy`] (its `patterns` field), built from
/// its rules, routes and org units on the first decision.
#[derive(Default)]
pub struct PatternIndex {
    built: std::sync::OnceLock<Tables>,
}

#[derive(Debug)]
pub(crate) struct Tables {
    /// The patterns of the compliance rules that match the recipient (outbound and both
    /// ways)...
    pub(crate) to: Table,
    /// ...and of those that match the sender (inbound and both ways).
    pub(crate) from: Table,
    pub(crate) routes: Table,
    /// The org units' sender patterns, all under the unit `""`.
    pub(crate) senders: Table,
    /// The number of rules, routes, units and patterns it was built from: debug builds
    /// check that a policy was not changed after its first decision.
    #[cfg(debug_assertions)]
    counts: [usize; 4],
}

impl PatternIndex {
    /// The tables for `policy`, built on the first call.
    pub(crate) fn get(&self, policy: &Policy) -> &Tables {
        let tables = self.built.get_or_init(|| Tables::build(policy));
        #[cfg(debug_assertions)]
        assert_eq!(
            tables.counts,
            counts(policy),
            "a policy's rules, routes or org units changed after its first decision"
        );
        tables
    }
}

impl Tables {
    fn build(policy: &Policy) -> Tables {
        Tables {
            to: rules(policy, Direction::Outbound),
            from: rules(policy, Direction::Inbound),
            routes: Table::build(
                &policy.recipient_delimiter,
                policy.routes.iter().enumerate().flat_map(|(r, route)| {
                    route
                        .patterns
                        .iter()
                        .enumerate()
                        .map(move |(i, p)| (route.org_unit.as_str(), r, i, p))
                }),
            ),
            senders: Table::build(
                &policy.recipient_delimiter,
                policy.org_units.iter().enumerate().flat_map(|(u, unit)| {
                    unit.senders
                        .iter()
                        .enumerate()
                        .map(move |(i, p)| ("", u, i, p))
                }),
            ),
            #[cfg(debug_assertions)]
            counts: counts(policy),
        }
    }
}

/// The patterns of the compliance rules that apply in direction `side` (one way or both).
fn rules(policy: &Policy, side: Direction) -> Table {
    let applies = move |rule: &&Rule| rule.direction == side || rule.direction == Direction::Both;
    Table::build(
        &policy.recipient_delimiter,
        policy
            .compliance
            .iter()
            .enumerate()
            .filter(move |(_, rule)| applies(rule))
            .flat_map(|(r, rule)| {
                rule.patterns
                    .iter()
                    .enumerate()
                    .map(move |(i, p)| (rule.org_unit.as_str(), r, i, p))
            }),
    )
}

#[cfg(debug_assertions)]
fn counts(policy: &Policy) -> [usize; 4] {
    let patterns = policy
        .compliance
        .iter()
        .map(|r| r.patterns.len())
        .sum::<usize>()
        + policy
            .routes
            .iter()
            .map(|r| r.patterns.len())
            .sum::<usize>()
        + policy
            .org_units
            .iter()
            .map(|u| u.senders.len())
            .sum::<usize>();
    [
        policy.compliance.len(),
        policy.routes.len(),
        policy.org_units.len(),
        patterns,
    ]
}

/// Derived data: equal whatever was built, not copied by `clone` (a clone builds its own,
/// so it may be changed before its first decision), shown as a name.
impl Clone for PatternIndex {
    fn clone(&self) -> Self {
        PatternIndex::default()
    }
}

impl PartialEq for PatternIndex {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for PatternIndex {}

impl std::fmt::Debug for PatternIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PatternIndex")
    }
}
