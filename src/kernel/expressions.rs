//! A rule's expressions as the verification compares them: each expression
//! the kernel holds ([`ParsedExpr`], every attribute that decides what it
//! matches or does) against the expression the model plans for it
//! ([`Expr`], see `batch::plan_rule`), attribute by attribute.
//!
//! The comparison is exact up to what the kernel adds or normalises when it
//! dumps an expression (net/netfilter/nft_*.c, `*_dump`):
//! - registers are numbered in 32-bit slots inside the kernel
//!   (`nft_parse_register`) and dumped under the 16-byte name when they
//!   start one (`nft_dump_register`): `NFT_REG32_04` comes back as
//!   `NFT_REG_2`. Registers compare by slot.
//! - a counter's counts change with traffic: a counter compares by kind.
//! - a lookup's flags are dumped as 0 when not inverted, or left out; both
//!   read as 0.
//! - a reject's ICMP code is dumped only for the ICMP kinds
//!   (`nft_reject_dump`).
//! - `redir` with only a minimum port register gets that register as its
//!   maximum too (`nft_redir_init`).
//!
//! Comparing costs no allocation; descriptions (nft's `--debug=netlink`
//! notation, names as the model names them) are made only for a rule that
//! differs.

use std::fmt::Write as _;

use super::attributes::{AnonymousContents, BitwiseData, ExprData, ParsedExpr, Reference};
use super::batch::{AnonymousSet, Expr, NF_NAT_RANGE_PROTO_SPECIFIED};
use super::ffi::RawElement;
use super::readback::KernelTable;
use super::rule_message::{ANONYMOUS_SET_FLAGS, is_anonymous_set};
use crate::ruleset::RejectKind;

/// The 32-bit slot a register number names, as the kernel stores it
/// (`nft_parse_register`): `NFT_REG_VERDICT`..`NFT_REG_4` are 16-byte
/// registers of four slots each, `NFT_REG32_00`..`NFT_REG32_15` single
/// slots from the first 16-byte register on. `None` for no register.
fn slot(register: u32) -> Option<u32> {
    const REG32_00: u32 = libc::NFT_REG32_00 as u32;
    const REG32_15: u32 = libc::NFT_REG32_15 as u32;
    match register {
        0..=4 => Some(register * 4),
        REG32_00..=REG32_15 => Some(register - REG32_00 + 4),
        _ => None,
    }
}

/// Whether two register numbers name the same register.
fn same_register(kernel: u32, model: u32) -> bool {
    slot(kernel).is_some() && slot(kernel) == slot(model)
}

fn same_optional_register(kernel: Option<u32>, model: Option<u32>) -> bool {
    match (kernel, model) {
        (Some(kernel), Some(model)) => same_register(kernel, model),
        (None, None) => true,
        _ => false,
    }
}

/// Whether `kernel`, as the table in force holds it, is exactly `model`.
/// References compare by model name (`table` maps kernel names).
pub fn same(table: &KernelTable, kernel: &ParsedExpr, model: &Expr) -> bool {
    if kernel.name != model.kernel_name() {
        return false;
    }
    let reg_1 = libc::NFT_REG_1 as u32;
    let no_reference = kernel.reference.is_none();
    match (model, &kernel.data) {
        (
            Expr::Meta { key, dreg },
            ExprData::Meta {
                key: k,
                dreg: d,
                sreg,
            },
        ) => no_reference && k == key && same_optional_register(*d, Some(*dreg)) && sreg.is_none(),
        (
            Expr::Payload {
                base,
                offset,
                len,
                dreg,
            },
            ExprData::Payload {
                base: b,
                offset: o,
                len: l,
                dreg: d,
                sreg,
                csum_type,
                csum_offset,
                csum_flags,
            },
        ) => {
            no_reference
                && (b, o, l) == (base, offset, len)
                && same_optional_register(*d, Some(*dreg))
                && sreg.is_none()
                && (*csum_type, *csum_offset, *csum_flags) == (0, 0, 0)
        }
        (Expr::CmpEq(value) | Expr::CmpNeq(value), ExprData::Cmp { sreg, op, data }) => {
            no_reference && same_register(*sreg, reg_1) && *op == cmp_op(model) && data == value
        }
        (Expr::Bitwise { mask, xor }, ExprData::Bitwise(bitwise)) => {
            let BitwiseData {
                sreg,
                dreg,
                len,
                op,
                mask: m,
                xor: x,
                data,
                sreg2,
            } = &**bitwise;
            no_reference
                && same_register(*sreg, reg_1)
                && same_register(*dreg, reg_1)
                && *len as usize == mask.len()
                // NFT_BITWISE_MASK_XOR (formerly NFT_BITWISE_BOOL).
                && *op == 0
                && m == mask
                && x == xor
                && data.is_empty()
                && sreg2.is_none()
        }
        (
            Expr::CtState,
            ExprData::Ct {
                key,
                dreg,
                sreg,
                direction,
            },
        ) => {
            no_reference
                && *key == libc::NFT_CT_STATE as u32
                && same_optional_register(*dreg, Some(reg_1))
                && sreg.is_none()
                && direction.is_none()
        }
        (
            Expr::CtSet { key, sreg },
            ExprData::Ct {
                key: k,
                dreg,
                sreg: s,
                direction,
            },
        ) => {
            no_reference
                && k == key
                && same_optional_register(*s, Some(*sreg))
                && dreg.is_none()
                && direction.is_none()
        }
        (
            Expr::Lookup { set, sreg },
            ExprData::Lookup {
                sreg: s,
                dreg,
                flags,
                anonymous: None,
            },
        ) => {
            matches!(&kernel.reference, Some(Reference::Set(name))
                if !is_anonymous_set(name) && table.set_model_name(name) == set)
                && same_register(*s, *sreg)
                && dreg.is_none()
                && *flags == 0
        }
        (
            Expr::LookupAnonymous(set),
            ExprData::Lookup {
                sreg,
                dreg,
                flags,
                anonymous: Some(contents),
            },
        ) => {
            matches!(&kernel.reference, Some(Reference::Set(name)) if is_anonymous_set(name))
                && same_register(*sreg, reg_1)
                && dreg.is_none()
                && *flags == 0
                && same_contents(contents, set)
        }
        // The counts change with traffic.
        (Expr::Counter, ExprData::Opaque) => no_reference,
        (
            Expr::Log { group, prefix },
            ExprData::Log {
                group: g,
                prefix: p,
                snaplen,
                qthreshold,
                level,
                flags,
            },
        ) => {
            no_reference
                && *g == Some(*group)
                && p.as_deref() == Some(prefix.as_str())
                && (*snaplen, *qthreshold, *flags) == (0, 0, 0)
                && level.is_none()
        }
        (Expr::Reject(reject), ExprData::Reject { kind, code }) => {
            no_reference && (*kind, *code) == reject_attributes(*reject)
        }
        (
            Expr::Accept | Expr::Drop | Expr::Jump(_),
            ExprData::Immediate {
                dreg,
                value: None,
                verdict: Some(verdict),
            },
        ) => {
            let target_matches = match (model, &kernel.reference) {
                (Expr::Jump(chain), Some(Reference::Jump(target))) => {
                    table.model_name(target) == chain
                }
                (Expr::Jump(_), _) => false,
                (_, reference) => reference.is_none(),
            };
            same_register(*dreg, libc::NFT_REG_VERDICT as u32)
                && *verdict == verdict_code(model)
                && target_matches
        }
        (
            Expr::Immediate { dreg, data },
            ExprData::Immediate {
                dreg: d,
                value: Some(value),
                verdict: None,
            },
        ) => no_reference && same_register(*d, *dreg) && value == data,
        (
            Expr::Redirect { sreg },
            ExprData::Redir {
                proto_min,
                proto_max,
                flags,
            },
        ) => {
            no_reference
                && same_optional_register(*proto_min, Some(*sreg))
                && proto_max.is_none_or(|max| same_register(max, *sreg))
                && *flags == NF_NAT_RANGE_PROTO_SPECIFIED
        }
        _ => false,
    }
}

/// Whether an anonymous set holds exactly the model's keys, single keys
/// (no range, no timeout), with the model's key type and length.
fn same_contents(kernel: &AnonymousContents, model: &AnonymousSet) -> bool {
    let single = |e: &RawElement| {
        e.key_end.is_none()
            && !e.interval_end
            && e.timeout_ms.is_none()
            && e.expiration_ms.is_none()
    };
    (kernel.flags, kernel.key_type, kernel.key_len)
        == (ANONYMOUS_SET_FLAGS, model.key_type, model.key_len)
        && kernel.elements.len() == model.keys.len()
        && kernel
            .elements
            .iter()
            .all(|e| single(e) && model.keys.contains(&e.key))
        && model
            .keys
            .iter()
            .all(|key| kernel.elements.iter().any(|e| e.key == *key))
}

/// Whether the kernel's expressions of a rule are exactly the model's.
pub fn same_rule(table: &KernelTable, kernel: &[ParsedExpr], model: &[Expr]) -> bool {
    kernel.len() == model.len()
        && kernel
            .iter()
            .zip(model)
            .all(|(kernel, model)| same(table, kernel, model))
}

/// `NFTA_REJECT_TYPE` and the `NFTA_REJECT_ICMP_CODE` the kernel dumps for
/// a reject: in an inet table, TCP reset, or ICMPX unreachable with the
/// admin-prohibited code (ICMP type 3 code 13, ICMPv6 type 1 code 1).
pub(super) fn reject_attributes(kind: RejectKind) -> (u32, Option<u8>) {
    match kind {
        RejectKind::TcpReset => (libc::NFT_REJECT_TCP_RST as u32, None),
        RejectKind::IcmpxAdminProhibited => (
            libc::NFT_REJECT_ICMPX_UNREACH as u32,
            Some(libc::NFT_REJECT_ICMPX_ADMIN_PROHIBITED as u8),
        ),
    }
}

/// `NFTA_CMP_OP` of a compare: `==` or `!=`.
pub(super) fn cmp_op(model: &Expr) -> u32 {
    match model {
        Expr::CmpNeq(_) => libc::NFT_CMP_NEQ as u32,
        _ => libc::NFT_CMP_EQ as u32,
    }
}

pub(super) fn verdict_code(model: &Expr) -> i32 {
    match model {
        Expr::Accept => libc::NF_ACCEPT,
        Expr::Drop => libc::NF_DROP,
        _ => libc::NFT_JUMP,
    }
}

/// The kernel's and the model's expressions of a rule that differ, each
/// described: the expressions at the positions where they differ, marked
/// with their position (`#3 cmp eq reg 1 0x01bc`), or all of them if the
/// rule has another number of expressions.
pub fn describe_differences(
    table: &KernelTable,
    kernel: &[ParsedExpr],
    model: &[Expr],
) -> (Vec<String>, Vec<String>) {
    if kernel.len() != model.len() {
        return (
            kernel.iter().map(|e| describe_kernel(table, e)).collect(),
            model.iter().map(describe_model).collect(),
        );
    }
    kernel
        .iter()
        .zip(model)
        .enumerate()
        .filter(|(_, (k, m))| !same(table, k, m))
        .map(|(at, (k, m))| {
            (
                format!("#{at} {}", describe_kernel(table, k)),
                format!("#{at} {}", describe_model(m)),
            )
        })
        .unzip()
}

/// A model expression as the kernel would hold it, with model names.
pub fn expected(model: &Expr) -> ParsedExpr {
    let reg_1 = libc::NFT_REG_1 as u32;
    let mut reference = None;
    let data = match model {
        Expr::Meta { key, dreg } => ExprData::Meta {
            key: *key,
            dreg: Some(*dreg),
            sreg: None,
        },
        Expr::Payload {
            base,
            offset,
            len,
            dreg,
        } => ExprData::Payload {
            base: *base,
            offset: *offset,
            len: *len,
            dreg: Some(*dreg),
            sreg: None,
            csum_type: 0,
            csum_offset: 0,
            csum_flags: 0,
        },
        Expr::CmpEq(value) | Expr::CmpNeq(value) => ExprData::Cmp {
            sreg: reg_1,
            op: cmp_op(model),
            data: value.clone(),
        },
        Expr::Bitwise { mask, xor } => ExprData::Bitwise(Box::new(BitwiseData {
            sreg: reg_1,
            dreg: reg_1,
            len: mask.len() as u32,
            op: 0,
            mask: mask.clone(),
            xor: xor.clone(),
            data: Vec::new(),
            sreg2: None,
        })),
        Expr::CtState => ExprData::Ct {
            key: libc::NFT_CT_STATE as u32,
            dreg: Some(reg_1),
            sreg: None,
            direction: None,
        },
        Expr::CtSet { key, sreg } => ExprData::Ct {
            key: *key,
            dreg: None,
            sreg: Some(*sreg),
            direction: None,
        },
        Expr::Lookup { set, sreg } => {
            reference = Some(Reference::Set(set.clone()));
            ExprData::Lookup {
                sreg: *sreg,
                dreg: None,
                flags: 0,
                anonymous: None,
            }
        }
        Expr::LookupAnonymous(set) => {
            reference = Some(Reference::Set("__set0".into()));
            let key = |key: &Vec<u8>| RawElement {
                key: key.clone(),
                key_end: None,
                interval_end: false,
                timeout_ms: None,
                expiration_ms: None,
            };
            ExprData::Lookup {
                sreg: reg_1,
                dreg: None,
                flags: 0,
                anonymous: Some(Box::new(AnonymousContents {
                    flags: ANONYMOUS_SET_FLAGS,
                    key_type: set.key_type,
                    key_len: set.key_len,
                    elements: set.keys.iter().map(key).collect(),
                })),
            }
        }
        Expr::Counter => ExprData::Opaque,
        Expr::Log { group, prefix } => ExprData::Log {
            group: Some(*group),
            prefix: Some(prefix.clone()),
            snaplen: 0,
            qthreshold: 0,
            level: None,
            flags: 0,
        },
        Expr::Reject(kind) => {
            let (kind, code) = reject_attributes(*kind);
            ExprData::Reject { kind, code }
        }
        Expr::Accept | Expr::Drop | Expr::Jump(_) => {
            if let Expr::Jump(chain) = model {
                reference = Some(Reference::Jump(chain.clone()));
            }
            ExprData::Immediate {
                dreg: libc::NFT_REG_VERDICT as u32,
                value: None,
                verdict: Some(verdict_code(model)),
            }
        }
        Expr::Immediate { dreg, data } => ExprData::Immediate {
            dreg: *dreg,
            value: Some(data.clone()),
            verdict: None,
        },
        Expr::Redirect { sreg } => ExprData::Redir {
            proto_min: Some(*sreg),
            proto_max: None,
            flags: NF_NAT_RANGE_PROTO_SPECIFIED,
        },
    };
    ParsedExpr {
        name: model.kernel_name().to_string(),
        counter: matches!(model, Expr::Counter).then_some((0, 0)),
        reference,
        data,
    }
}

/// A model expression in nft's `--debug=netlink` notation.
pub fn describe_model(model: &Expr) -> String {
    describe(&expected(model), |name| name.to_string())
}

/// A kernel expression in nft's `--debug=netlink` notation, with model names.
pub fn describe_kernel(table: &KernelTable, kernel: &ParsedExpr) -> String {
    describe(kernel, |name| match kernel.reference {
        Some(Reference::Set(_)) => table.set_model_name(name).to_string(),
        _ => table.model_name(name).to_string(),
    })
}

/// An anonymous set's elements as `{ 0x0035, 0x0355 }`, sorted, and its
/// definition if it is not what `batch` creates.
fn describe_contents(contents: &AnonymousContents) -> String {
    let mut keys: Vec<String> = contents
        .elements
        .iter()
        .map(|e| {
            let mut text = hex(&e.key);
            if let Some(end) = &e.key_end {
                let _ = write!(text, "-{}", hex(end));
            }
            if e.interval_end {
                text.push_str(" (interval end)");
            }
            text
        })
        .collect();
    keys.sort();
    let mut text = format!("{{ {} }}", keys.join(", "));
    if contents.flags != ANONYMOUS_SET_FLAGS {
        let _ = write!(text, " flags {:#x}", contents.flags);
    }
    let _ = write!(
        text,
        " (key type {} of {} bytes)",
        contents.key_type, contents.key_len
    );
    text
}

fn hex(bytes: &[u8]) -> String {
    format!("0x{}", hex::encode(bytes))
}

fn meta_key(key: u32) -> String {
    match key as i32 {
        libc::NFT_META_MARK => "mark".into(),
        libc::NFT_META_IIF => "iif".into(),
        libc::NFT_META_OIF => "oif".into(),
        libc::NFT_META_NFPROTO => "nfproto".into(),
        libc::NFT_META_L4PROTO => "l4proto".into(),
        _ => format!("key {key}"),
    }
}

fn ct_key(key: u32) -> String {
    match key as i32 {
        libc::NFT_CT_STATE => "state".into(),
        libc::NFT_CT_ZONE => "zone".into(),
        _ => format!("key {key}"),
    }
}

fn payload_base(base: u32) -> String {
    match base as i32 {
        libc::NFT_PAYLOAD_LL_HEADER => "link".into(),
        libc::NFT_PAYLOAD_NETWORK_HEADER => "network".into(),
        libc::NFT_PAYLOAD_TRANSPORT_HEADER => "transport".into(),
        _ => format!("base {base}"),
    }
}

fn verdict_name(code: i32) -> String {
    match code {
        libc::NF_ACCEPT => "accept".into(),
        libc::NF_DROP => "drop".into(),
        libc::NFT_JUMP => "jump".into(),
        libc::NFT_GOTO => "goto".into(),
        libc::NFT_RETURN => "return".into(),
        libc::NFT_CONTINUE => "continue".into(),
        libc::NFT_BREAK => "break".into(),
        other => format!("verdict {other}"),
    }
}

/// `reg N`, and what is unusual about a register (a 32-bit one).
fn register(register: u32) -> String {
    match register {
        0..=4 => format!("reg {register}"),
        other => format!("reg32 {}", other.wrapping_sub(libc::NFT_REG32_00 as u32)),
    }
}

fn describe(expr: &ParsedExpr, name: impl Fn(&str) -> String) -> String {
    let reference = match &expr.reference {
        Some(Reference::Set(set)) => format!("@{}", name(set)),
        Some(Reference::Jump(chain) | Reference::Goto(chain)) => name(chain),
        None => String::new(),
    };
    let optional = |reg: Option<u32>| reg.map_or("no register".to_string(), register);
    match &expr.data {
        ExprData::Opaque if expr.name == "counter" => "counter".into(),
        ExprData::Opaque => format!("{} (attributes not decoded)", expr.name),
        ExprData::Meta { key, dreg, sreg } => match sreg {
            Some(sreg) => format!("meta set {} with {}", meta_key(*key), register(*sreg)),
            None => format!("meta load {} => {}", meta_key(*key), optional(*dreg)),
        },
        ExprData::Payload {
            base,
            offset,
            len,
            dreg,
            sreg,
            csum_type,
            csum_offset,
            csum_flags,
        } => {
            let mut text = match sreg {
                Some(sreg) => format!(
                    "payload write {} => {len}b @ {} header + {offset} csum_type {csum_type} \
                     csum_off {csum_offset} csum_flags {csum_flags:#x}",
                    register(*sreg),
                    payload_base(*base)
                ),
                None => format!(
                    "payload load {len}b @ {} header + {offset} => {}",
                    payload_base(*base),
                    optional(*dreg)
                ),
            };
            if sreg.is_none() && (*csum_type, *csum_offset, *csum_flags) != (0, 0, 0) {
                let _ = write!(
                    text,
                    " csum_type {csum_type} csum_off {csum_offset} csum_flags {csum_flags:#x}"
                );
            }
            text
        }
        ExprData::Cmp { sreg, op, data } => {
            let op = match *op as i32 {
                libc::NFT_CMP_EQ => "eq".to_string(),
                libc::NFT_CMP_NEQ => "neq".to_string(),
                libc::NFT_CMP_LT => "lt".to_string(),
                libc::NFT_CMP_LTE => "lte".to_string(),
                libc::NFT_CMP_GT => "gt".to_string(),
                libc::NFT_CMP_GTE => "gte".to_string(),
                other => format!("op {other}"),
            };
            format!("cmp {op} {} {}", register(*sreg), hex(data))
        }
        ExprData::Bitwise(bitwise) => {
            let BitwiseData {
                sreg,
                dreg,
                len,
                op,
                mask,
                xor,
                data,
                sreg2,
            } = &**bitwise;
            let mut text = format!(
                "bitwise {} = ({} & {}) ^ {} len {len}",
                register(*dreg),
                register(*sreg),
                hex(mask),
                hex(xor)
            );
            if *op != 0 || !data.is_empty() || sreg2.is_some() {
                let _ = write!(text, " op {op} data {}", hex(data));
                if let Some(sreg2) = sreg2 {
                    let _ = write!(text, " with {}", register(*sreg2));
                }
            }
            text
        }
        ExprData::Ct {
            key,
            dreg,
            sreg,
            direction,
        } => {
            let direction = direction.map_or(String::new(), |d| format!(" direction {d}"));
            match sreg {
                Some(sreg) => format!(
                    "ct set {}{direction} with {}",
                    ct_key(*key),
                    register(*sreg)
                ),
                None => format!("ct load {}{direction} => {}", ct_key(*key), optional(*dreg)),
            }
        }
        ExprData::Lookup {
            sreg,
            dreg,
            flags,
            anonymous,
        } => {
            let inverted = if flags & libc::NFT_LOOKUP_F_INV as u32 != 0 {
                "!"
            } else {
                ""
            };
            // An anonymous set by what it holds: its name changes with every
            // rule that creates one.
            let set = match (anonymous, &expr.reference) {
                (Some(contents), _) => describe_contents(contents),
                (None, Some(Reference::Set(name))) if is_anonymous_set(name) => {
                    format!("{reference} (elements not read)")
                }
                _ => reference.clone(),
            };
            let mut text = format!("lookup {} {inverted}{set}", register(*sreg));
            if let Some(dreg) = dreg {
                let _ = write!(text, " => {}", register(*dreg));
            }
            let other = flags & !(libc::NFT_LOOKUP_F_INV as u32);
            if other != 0 {
                let _ = write!(text, " flags {other:#x}");
            }
            text
        }
        ExprData::Log {
            group,
            prefix,
            snaplen,
            qthreshold,
            level,
            flags,
        } => {
            let mut text = String::from("log");
            if let Some(prefix) = prefix {
                let _ = write!(text, " prefix {prefix:?}");
            }
            if let Some(group) = group {
                let _ = write!(text, " group {group}");
            }
            if let Some(level) = level {
                let _ = write!(text, " level {level}");
            }
            for (what, value) in [
                ("snaplen", *snaplen),
                ("qthreshold", u32::from(*qthreshold)),
                ("flags", *flags),
            ] {
                if value != 0 {
                    let _ = write!(text, " {what} {value}");
                }
            }
            text
        }
        ExprData::Reject { kind, code } => {
            let kind = match *kind as i32 {
                libc::NFT_REJECT_TCP_RST => "tcp reset".to_string(),
                libc::NFT_REJECT_ICMP_UNREACH => "icmp".to_string(),
                libc::NFT_REJECT_ICMPX_UNREACH => "icmpx".to_string(),
                other => format!("type {other}"),
            };
            match code {
                Some(code) => format!("reject {kind} code {code}"),
                None => format!("reject {kind}"),
            }
        }
        ExprData::Immediate {
            dreg,
            value,
            verdict,
        } => {
            let mut text = match (verdict, value) {
                (Some(code), _) if reference.is_empty() => verdict_name(*code),
                (Some(code), _) => format!("{} {reference}", verdict_name(*code)),
                (None, Some(value)) => format!("immediate {} {}", register(*dreg), hex(value)),
                (None, None) => format!("immediate {} (no data)", register(*dreg)),
            };
            if verdict.is_some() && *dreg != libc::NFT_REG_VERDICT as u32 {
                let _ = write!(text, " into {}", register(*dreg));
            }
            text
        }
        ExprData::Redir {
            proto_min,
            proto_max,
            flags,
        } => {
            let mut text = String::from("redir");
            if let Some(min) = proto_min {
                let _ = write!(text, " proto_min {}", register(*min));
            }
            if let Some(max) = proto_max.filter(|max| Some(*max) != *proto_min) {
                let _ = write!(text, " proto_max {}", register(max));
            }
            let _ = write!(text, " flags {flags:#x}");
            text
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table in no generation: kernel names are model names.
    fn table() -> KernelTable {
        KernelTable {
            digest: None,
            generation: None,
            generation_comment: None,
            sets: Vec::new(),
            chains: Vec::new(),
            leftover_sets: Vec::new(),
            leftover_chains: Vec::new(),
        }
    }

    const REG_1: u32 = libc::NFT_REG_1 as u32;

    fn reg32(n: u32) -> u32 {
        libc::NFT_REG32_00 as u32 + n
    }

    /// One of each kind of expression the compiler plans.
    fn models() -> Vec<Expr> {
        crate::kernel::batch::one_of_each_expression()
    }

    #[test]
    fn registers_compare_by_the_slot_the_kernel_stores() {
        // nft_dump_register: a 32-bit register that starts a 16-byte one is
        // dumped under the 16-byte name.
        assert!(same_register(libc::NFT_REG_1 as u32, reg32(0)));
        assert!(same_register(libc::NFT_REG_2 as u32, reg32(4)));
        assert!(same_register(reg32(1), reg32(1)));
        assert!(!same_register(libc::NFT_REG_1 as u32, reg32(1)));
        assert!(!same_register(
            libc::NFT_REG_2 as u32,
            libc::NFT_REG_1 as u32
        ));
        assert!(!same_register(99, 99), "not a register");
        // The kernel's form of a load into 32-bit register 4.
        let mut kernel = expected(&models()[0]);
        let ExprData::Meta { dreg, .. } = &mut kernel.data else {
            unreachable!()
        };
        *dreg = Some(libc::NFT_REG_2 as u32);
        assert!(same(&table(), &kernel, &models()[0]));
    }

    #[test]
    fn every_model_expression_is_its_expected_form_and_no_other() {
        let table = table();
        let models = models();
        for (i, model) in models.iter().enumerate() {
            for (j, other) in models.iter().enumerate() {
                assert_eq!(
                    same(&table, &expected(other), model),
                    i == j,
                    "{model:?} against the expected form of {other:?}"
                );
            }
        }
    }

    /// What the kernel adds or normalises is no difference.
    #[test]
    fn what_the_kernel_normalises_is_no_difference() {
        let table = table();
        // Counts.
        let counter = ParsedExpr {
            counter: Some((7, 420)),
            ..expected(&Expr::Counter)
        };
        assert!(same(&table, &counter, &Expr::Counter));
        // A redirect's maximum register, set to its minimum.
        let redirect = Expr::Redirect { sreg: REG_1 };
        let mut kernel = expected(&redirect);
        let ExprData::Redir { proto_max, .. } = &mut kernel.data else {
            unreachable!()
        };
        *proto_max = Some(REG_1);
        assert!(same(&table, &kernel, &redirect));
        // An anonymous set's elements in another order, under another name.
        let anonymous = &models()[7];
        let mut kernel = expected(anonymous);
        kernel.reference = Some(Reference::Set("__set17".into()));
        let ExprData::Lookup {
            anonymous: Some(contents),
            ..
        } = &mut kernel.data
        else {
            unreachable!()
        };
        contents.elements.reverse();
        assert!(same(&table, &kernel, anonymous));
    }

    /// Every attribute that changes what a rule matches or does is a difference.
    #[test]
    fn each_changed_attribute_is_a_difference() {
        let table = table();
        let models = models();
        let model = |kind: &str| {
            models
                .iter()
                .find(|m| format!("{m:?}").starts_with(kind))
                .unwrap()
                .clone()
        };
        type Change = fn(&mut ParsedExpr);
        let cases: Vec<(Expr, &str, Change)> = vec![
            (model("Meta"), "meta key", |e| {
                if let ExprData::Meta { key, .. } = &mut e.data {
                    *key = libc::NFT_META_IIF as u32;
                }
            }),
            (model("Meta"), "meta set", |e| {
                if let ExprData::Meta { dreg, sreg, .. } = &mut e.data {
                    (*dreg, *sreg) = (None, Some(REG_1));
                }
            }),
            (model("Payload"), "payload offset", |e| {
                if let ExprData::Payload { offset, .. } = &mut e.data {
                    *offset = 12;
                }
            }),
            (model("Payload"), "payload base", |e| {
                if let ExprData::Payload { base, .. } = &mut e.data {
                    *base = libc::NFT_PAYLOAD_TRANSPORT_HEADER as u32;
                }
            }),
            (model("Payload"), "payload checksum", |e| {
                if let ExprData::Payload { csum_flags, .. } = &mut e.data {
                    *csum_flags = 1;
                }
            }),
            (model("CmpEq"), "cmp value", |e| {
                if let ExprData::Cmp { data, .. } = &mut e.data {
                    data[1] = 188;
                }
            }),
            (model("CmpEq"), "cmp op", |e| {
                if let ExprData::Cmp { op, .. } = &mut e.data {
                    *op = libc::NFT_CMP_GTE as u32;
                }
            }),
            (model("CmpEq"), "cmp register", |e| {
                if let ExprData::Cmp { sreg, .. } = &mut e.data {
                    *sreg = libc::NFT_REG_2 as u32;
                }
            }),
            (model("Bitwise"), "bitwise mask", |e| {
                if let ExprData::Bitwise(bitwise) = &mut e.data {
                    bitwise.mask[0] = 2;
                }
            }),
            (model("Bitwise"), "bitwise op", |e| {
                if let ExprData::Bitwise(bitwise) = &mut e.data {
                    bitwise.op = 1;
                }
            }),
            (model("CtState"), "ct key", |e| {
                if let ExprData::Ct { key, .. } = &mut e.data {
                    *key = libc::NFT_CT_MARK as u32;
                }
            }),
            (model("CtState"), "ct direction", |e| {
                if let ExprData::Ct { direction, .. } = &mut e.data {
                    *direction = Some(0);
                }
            }),
            (model("Lookup"), "not in set", |e| {
                if let ExprData::Lookup { flags, .. } = &mut e.data {
                    *flags = libc::NFT_LOOKUP_F_INV as u32;
                }
            }),
            (model("Lookup"), "a map", |e| {
                if let ExprData::Lookup { dreg, .. } = &mut e.data {
                    *dreg = Some(REG_1);
                }
            }),
            (model("Lookup"), "another set", |e| {
                e.reference = Some(Reference::Set("allow_v6".into()));
            }),
            (model("LookupAnonymous"), "another key", |e| {
                if let ExprData::Lookup {
                    anonymous: Some(contents),
                    ..
                } = &mut e.data
                {
                    contents.elements[1].key = vec![3, 86];
                }
            }),
            (model("LookupAnonymous"), "one key more", |e| {
                if let ExprData::Lookup {
                    anonymous: Some(contents),
                    ..
                } = &mut e.data
                {
                    let mut extra = contents.elements[0].clone();
                    extra.key = vec![0, 22];
                    contents.elements.push(extra);
                }
            }),
            (model("LookupAnonymous"), "an interval set", |e| {
                if let ExprData::Lookup {
                    anonymous: Some(contents),
                    ..
                } = &mut e.data
                {
                    contents.flags |= libc::NFT_SET_INTERVAL as u32;
                }
            }),
            (model("LookupAnonymous"), "contents not read", |e| {
                if let ExprData::Lookup { anonymous, .. } = &mut e.data {
                    *anonymous = None;
                }
            }),
            (model("LookupAnonymous"), "inverted", |e| {
                if let ExprData::Lookup { flags, .. } = &mut e.data {
                    *flags = libc::NFT_LOOKUP_F_INV as u32;
                }
            }),
            (model("Log"), "log group", |e| {
                if let ExprData::Log { group, .. } = &mut e.data {
                    *group = Some(4712);
                }
            }),
            (model("Log"), "log prefix", |e| {
                if let ExprData::Log { prefix, .. } = &mut e.data {
                    *prefix = Some("other ".into());
                }
            }),
            (model("Log"), "syslog", |e| {
                if let ExprData::Log { group, level, .. } = &mut e.data {
                    (*group, *level) = (None, Some(4));
                }
            }),
            (model("Reject(TcpReset"), "reject kind", |e| {
                if let ExprData::Reject { kind, .. } = &mut e.data {
                    *kind = libc::NFT_REJECT_ICMPX_UNREACH as u32;
                }
            }),
            (model("Reject(Icmpx"), "reject code", |e| {
                if let ExprData::Reject { code, .. } = &mut e.data {
                    *code = Some(libc::NFT_REJECT_ICMPX_PORT_UNREACH as u8);
                }
            }),
            (model("Accept"), "drop", |e| {
                if let ExprData::Immediate { verdict, .. } = &mut e.data {
                    *verdict = Some(libc::NF_DROP);
                }
            }),
            (model("Jump"), "goto", |e| {
                if let ExprData::Immediate { verdict, .. } = &mut e.data {
                    *verdict = Some(libc::NFT_GOTO);
                }
                e.reference = Some(Reference::Goto("deny".into()));
            }),
            (model("Jump"), "another chain", |e| {
                e.reference = Some(Reference::Jump("egress".into()));
            }),
            (model("Immediate"), "another value", |e| {
                if let ExprData::Immediate { value, .. } = &mut e.data {
                    *value = Some(vec![4, 30]);
                }
            }),
            (model("Redirect"), "redirect flags", |e| {
                if let ExprData::Redir { flags, .. } = &mut e.data {
                    *flags = 0;
                }
            }),
            (model("CtSet"), "ct set key", |e| {
                if let ExprData::Ct { key, .. } = &mut e.data {
                    *key = libc::NFT_CT_MARK as u32;
                }
            }),
            (model("Counter"), "another expression", |e| {
                e.name = "quota".into();
            }),
        ];
        for (model, what, change) in cases {
            let mut kernel = expected(&model);
            let before = kernel.clone();
            change(&mut kernel);
            assert_ne!(kernel, before, "{what}: the change changes nothing");
            assert!(!same(&table, &kernel, &model), "{what} is no difference");
            let (have, want) =
                describe_differences(&table, std::slice::from_ref(&kernel), &[model]);
            assert_eq!((have.len(), want.len()), (1, 1), "{what}");
            assert_ne!(have, want, "{what}: both sides read the same");
        }
    }

    #[test]
    fn descriptions_read_like_nft_debug_output() {
        let table = table();
        let mut inverted = expected(&models()[6]);
        if let ExprData::Lookup { flags, .. } = &mut inverted.data {
            *flags = libc::NFT_LOOKUP_F_INV as u32;
        }
        assert_eq!(
            describe_kernel(&table, &inverted),
            "lookup reg 1 !@allow_v4"
        );
        let described: Vec<String> = models().iter().map(describe_model).collect();
        assert_eq!(
            described,
            [
                "meta load l4proto => reg32 4",
                "payload load 4b @ network header + 16 => reg 1",
                "cmp eq reg 1 0x01bb",
                "cmp neq reg 1 0x6c6e0000",
                "bitwise reg 1 = (reg 1 & 0x06000000) ^ 0x00000000 len 4",
                "ct load state => reg 1",
                "lookup reg 1 @allow_v4",
                "lookup reg 1 { 0x0035, 0x0355 } (key type 13 of 2 bytes)",
                "counter",
                "log prefix \"netleash deny \" group 4711",
                "reject tcp reset",
                "reject icmpx code 3",
                "accept",
                "drop",
                "jump deny",
                "immediate reg 1 0x041d",
                "redir proto_min reg 1 flags 0x2",
                "ct set zone with reg 1",
            ]
        );
        // Rules with another number of expressions show all of them.
        let (have, want) = describe_differences(&table, &[expected(&Expr::Accept)], &models());
        assert_eq!(have, ["accept"]);
        assert_eq!(want.len(), models().len());
    }
}
