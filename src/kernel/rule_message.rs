//! Rule messages (`NFT_MSG_NEWRULE`) written straight from planned
//! expressions ([`Expr`], see `batch::plan_rule`), attribute by attribute,
//! into one buffer per rule.
//!
//! The bytes are the ones libnftnl 1.2.4 writes for the same rule
//! (`nftnl_rule_nlmsg_build_payload` and each expression's `build`): the
//! same attributes in the same order, integers in network byte order,
//! strings with their NUL, every attribute padded to 4 bytes with zeros
//! and nests flagged `NLA_F_NESTED` (libmnl). The unit tests compare the
//! two byte for byte, for every rule the bundled policies compile to.
//! Writing them here skips libnftnl's allocation of each expression, its
//! setters and its frees: the 15 rules of
//! policies/examples/claude-limited.json take about 20 µs to plan and
//! write instead of 37 µs (see docs/benchmarks.md), and no unsafe code is
//! needed but the copy into the batch (`ffi::RuleMsg`).
//!
//! The attributes are those of include/uapi/linux/netfilter/nf_tables.h
//! (the constants in `attributes`, which decodes the same messages).

use super::Error;
use super::attributes as nfta;
use super::batch::{AnonymousSet, Expr};
use super::expressions::{cmp_op, reject_attributes, verdict_code};
use super::ffi::RuleMsg;

/// `NLA_F_NESTED` (include/uapi/linux/netlink.h).
const NLA_F_NESTED: u16 = 1 << 15;

/// The name an anonymous set is created with: the kernel replaces `%d`
/// with a free number (`nf_tables_set_alloc_name`).
pub const ANONYMOUS_SET_NAME: &str = "__set%d";

/// `NFTA_SET_FLAGS` of the anonymous sets a rule's lookup creates.
pub const ANONYMOUS_SET_FLAGS: u32 = (libc::NFT_SET_ANONYMOUS | libc::NFT_SET_CONSTANT) as u32;

/// Whether `name` is an anonymous set's kernel name ([`ANONYMOUS_SET_NAME`]
/// with its number).
pub fn is_anonymous_set(name: &str) -> bool {
    name.starts_with(ANONYMOUS_SET_NAME.trim_end_matches("%d"))
}

/// `NFTNL_UDATA_RULE_COMMENT` (libnftnl include/udata.h).
const UDATA_RULE_COMMENT: u8 = 0;

/// `NFTNL_UDATA_COMMENT_MAXLEN` (libnftnl): the user data buffer a comment
/// goes into holds its type and length bytes, the text and its NUL.
const COMMENT_BUFFER: usize = 128;

/// What the expressions of a rule refer to by name, as the kernel knows
/// it: asked for by [`RuleWriter::expression`] as it writes a lookup or a
/// jump.
pub trait References {
    /// The kernel name of the set the model calls `set`, and its id in the
    /// transaction when the transaction creates it (`NFTA_LOOKUP_SET_ID`).
    fn named_set(&mut self, set: &str) -> Result<(String, Option<u32>), Error>;
    /// The transaction id of the anonymous set holding `set`'s keys, which
    /// the transaction creates (as `__set%d`) before the rule.
    fn anonymous_set(&mut self, set: &AnonymousSet) -> Result<u32, Error>;
    /// The kernel name of the chain the model calls `chain`.
    fn chain(&self, chain: &str) -> String;
}

/// Netlink attributes being written (`struct nlattr`, then the value).
#[derive(Debug, Default)]
struct Attributes {
    bytes: Vec<u8>,
}

impl Attributes {
    fn put(&mut self, kind: usize, value: &[u8]) {
        self.header(kind, value.len());
        self.bytes.extend_from_slice(value);
        self.pad();
    }

    /// An attribute's header, for a value of `length` bytes. A length that
    /// does not fit 16 bits is caught by [`RuleWriter::finish`], which
    /// refuses a message whose whole length does not.
    fn header(&mut self, kind: usize, length: usize) {
        self.bytes
            .extend_from_slice(&((4 + length) as u16).to_ne_bytes());
        self.bytes.extend_from_slice(&(kind as u16).to_ne_bytes());
    }

    fn pad(&mut self) {
        let padded = self.bytes.len().next_multiple_of(4);
        self.bytes.resize(padded, 0);
    }

    fn put_u32(&mut self, kind: usize, value: u32) {
        self.put(kind, &value.to_be_bytes());
    }

    fn put_u16(&mut self, kind: usize, value: u16) {
        self.put(kind, &value.to_be_bytes());
    }

    fn put_u8(&mut self, kind: usize, value: u8) {
        self.put(kind, &[value]);
    }

    /// A string with its NUL; a NUL inside it is refused.
    fn put_str(&mut self, kind: usize, value: &str) -> Result<(), Error> {
        if value.as_bytes().contains(&0) {
            return Err(Error::InvalidName {
                name: value.to_string(),
            });
        }
        self.header(kind, value.len() + 1);
        self.bytes.extend_from_slice(value.as_bytes());
        self.bytes.push(0);
        self.pad();
        Ok(())
    }

    /// Start a nest; [`Attributes::end`] writes its length.
    fn start(&mut self, kind: usize) -> usize {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(&[0, 0]);
        self.bytes
            .extend_from_slice(&(kind as u16 | NLA_F_NESTED).to_ne_bytes());
        start
    }

    fn end(&mut self, start: usize) {
        let length = (self.bytes.len() - start) as u16;
        self.bytes[start..start + 2].copy_from_slice(&length.to_ne_bytes());
    }

    /// A lookup's attributes: `lookup reg SREG set NAME` (with the set's
    /// transaction id when the transaction creates it).
    fn put_lookup(&mut self, sreg: u32, set: &str, id: Option<u32>) -> Result<(), Error> {
        self.put_u32(nfta::NFTA_LOOKUP_SREG, sreg);
        self.put_str(nfta::NFTA_LOOKUP_SET, set)?;
        if let Some(id) = id {
            self.put_u32(nfta::NFTA_LOOKUP_SET_ID, id);
        }
        Ok(())
    }

    /// `NFTA_*_DATA { NFTA_DATA_VALUE value }`.
    fn put_value(&mut self, kind: usize, value: &[u8]) {
        let data = self.start(kind);
        self.put(nfta::NFTA_DATA_VALUE, value);
        self.end(data);
    }
}

/// Names that are the kernel's already: a set or a chain by the name given,
/// in a transaction that creates neither (a jump back into the generation
/// in force, `batch::swap_back`).
pub struct KernelNames;

impl References for KernelNames {
    fn named_set(&mut self, set: &str) -> Result<(String, Option<u32>), Error> {
        Ok((set.to_string(), None))
    }

    /// A transaction with kernel names only creates no set.
    fn anonymous_set(&mut self, _: &AnonymousSet) -> Result<u32, Error> {
        Err(Error::InvalidName {
            name: ANONYMOUS_SET_NAME.into(),
        })
    }

    fn chain(&self, chain: &str) -> String {
        chain.to_string()
    }
}

/// The rule being written: its table, chain and comment, then its
/// expressions one by one ([`RuleWriter::expression`]).
#[derive(Debug)]
pub struct RuleWriter {
    attributes: Attributes,
    expressions: usize,
    chain: String,
}

impl RuleWriter {
    /// A rule of chain `chain` in table `table`, with `comment` in its user
    /// data (what nft shows as `comment "..."`).
    pub fn new(table: &str, chain: &str, comment: Option<&str>) -> Result<RuleWriter, Error> {
        let mut attributes = Attributes {
            bytes: Vec::with_capacity(512),
        };
        attributes.put_str(nfta::NFTA_RULE_TABLE, table)?;
        attributes.put_str(nfta::NFTA_RULE_CHAIN, chain)?;
        if let Some(comment) = comment {
            // The comment as libnftnl's user data buffer holds it: type,
            // length (with the NUL), text, NUL; refused where libnftnl
            // refuses it.
            if comment.as_bytes().contains(&0) || comment.len() + 3 > COMMENT_BUFFER {
                return Err(Error::InvalidName {
                    name: comment.to_string(),
                });
            }
            let mut user_data = Vec::with_capacity(comment.len() + 3);
            user_data.push(UDATA_RULE_COMMENT);
            user_data.push((comment.len() + 1) as u8);
            user_data.extend_from_slice(comment.as_bytes());
            user_data.push(0);
            attributes.put(nfta::NFTA_RULE_USERDATA, &user_data);
        }
        let expressions = attributes.start(nfta::NFTA_RULE_EXPRESSIONS);
        Ok(RuleWriter {
            attributes,
            expressions,
            chain: chain.to_string(),
        })
    }

    /// Append `expr`; `names` names what it refers to (a lookup's set, a
    /// jump's chain).
    pub fn expression(&mut self, expr: &Expr, names: &mut impl References) -> Result<(), Error> {
        let out = &mut self.attributes;
        let element = out.start(nfta::NFTA_LIST_ELEM);
        out.put_str(nfta::NFTA_EXPR_NAME, expr.kernel_name())?;
        let data = out.start(nfta::NFTA_EXPR_DATA);
        match expr {
            Expr::Meta { key, dreg } => {
                out.put_u32(nfta::NFTA_META_KEY, *key);
                out.put_u32(nfta::NFTA_META_DREG, *dreg);
            }
            Expr::Payload {
                base,
                offset,
                len,
                dreg,
            } => {
                out.put_u32(nfta::NFTA_PAYLOAD_DREG, *dreg);
                out.put_u32(nfta::NFTA_PAYLOAD_BASE, *base);
                out.put_u32(nfta::NFTA_PAYLOAD_OFFSET, *offset);
                out.put_u32(nfta::NFTA_PAYLOAD_LEN, *len);
            }
            Expr::CmpEq(value) | Expr::CmpNeq(value) => {
                out.put_u32(nfta::NFTA_CMP_SREG, libc::NFT_REG_1 as u32);
                out.put_u32(nfta::NFTA_CMP_OP, cmp_op(expr));
                out.put_value(nfta::NFTA_CMP_DATA, value);
            }
            Expr::Bitwise { mask, xor } => {
                out.put_u32(nfta::NFTA_BITWISE_SREG, libc::NFT_REG_1 as u32);
                out.put_u32(nfta::NFTA_BITWISE_DREG, libc::NFT_REG_1 as u32);
                out.put_u32(nfta::NFTA_BITWISE_LEN, mask.len() as u32);
                out.put_value(nfta::NFTA_BITWISE_MASK, mask);
                out.put_value(nfta::NFTA_BITWISE_XOR, xor);
            }
            Expr::CtState => {
                out.put_u32(nfta::NFTA_CT_KEY, libc::NFT_CT_STATE as u32);
                out.put_u32(nfta::NFTA_CT_DREG, libc::NFT_REG_1 as u32);
            }
            Expr::CtSet { key, sreg } => {
                out.put_u32(nfta::NFTA_CT_KEY, *key);
                out.put_u32(nfta::NFTA_CT_SREG, *sreg);
            }
            Expr::Lookup { set, sreg } => {
                let (name, id) = names.named_set(set)?;
                out.put_lookup(*sreg, &name, id)?;
            }
            Expr::LookupAnonymous(set) => {
                let id = names.anonymous_set(set)?;
                out.put_lookup(libc::NFT_REG_1 as u32, ANONYMOUS_SET_NAME, Some(id))?;
            }
            // A counter without counts: the kernel starts it at zero.
            Expr::Counter => {}
            Expr::Log { group, prefix } => {
                out.put_str(nfta::NFTA_LOG_PREFIX, prefix)?;
                out.put_u16(nfta::NFTA_LOG_GROUP, *group);
            }
            Expr::Reject(kind) => {
                let (kind, code) = reject_attributes(*kind);
                out.put_u32(nfta::NFTA_REJECT_TYPE, kind);
                // The code is sent for a TCP reset too (as 0); the kernel
                // reads it for the ICMP kinds only (`nft_reject_init`).
                out.put_u8(nfta::NFTA_REJECT_ICMP_CODE, code.unwrap_or(0));
            }
            Expr::Accept | Expr::Drop | Expr::Jump(_) => {
                out.put_u32(nfta::NFTA_IMMEDIATE_DREG, libc::NFT_REG_VERDICT as u32);
                let immediate = out.start(nfta::NFTA_IMMEDIATE_DATA);
                let verdict = out.start(nfta::NFTA_DATA_VERDICT);
                out.put_u32(nfta::NFTA_VERDICT_CODE, verdict_code(expr) as u32);
                if let Expr::Jump(chain) = expr {
                    out.put_str(nfta::NFTA_VERDICT_CHAIN, &names.chain(chain))?;
                }
                out.end(verdict);
                out.end(immediate);
            }
            Expr::Immediate { dreg, data } => {
                out.put_u32(nfta::NFTA_IMMEDIATE_DREG, *dreg);
                out.put_value(nfta::NFTA_IMMEDIATE_DATA, data);
            }
            Expr::Redirect { sreg } => {
                out.put_u32(nfta::NFTA_REDIR_REG_PROTO_MIN, *sreg);
                out.put_u32(
                    nfta::NFTA_REDIR_FLAGS,
                    super::batch::NF_NAT_RANGE_PROTO_SPECIFIED,
                );
            }
        }
        out.end(data);
        out.end(element);
        Ok(())
    }

    /// The message, with its expressions closed. Every length must fit the
    /// 16 bits of a netlink attribute's length (the expressions' nest's is
    /// the largest of them), and so must the whole.
    pub fn finish(mut self) -> Result<RuleMsg, Error> {
        let bytes = self.attributes.bytes.len();
        if bytes > usize::from(u16::MAX) {
            return Err(Error::RuleTooLarge {
                chain: self.chain,
                bytes,
            });
        }
        self.attributes.end(self.expressions);
        Ok(RuleMsg::new(self.attributes.bytes))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::ffi::CString;

    use nftnl::ProtoFamily;
    use nftnl::expr::{Bitwise, Cmp, CmpOp, Conntrack, Counter, IcmpCode, RejectionType, Verdict};

    use super::*;
    use crate::kernel::batch::{AnonymousSet, NF_NAT_RANGE_PROTO_SPECIFIED, plan_rule};
    use crate::kernel::ffi::reference::{self, message_bytes};
    use crate::policy::{CompileOptions, Expansions, ProxyOptions};
    use crate::ruleset::{RejectKind, TABLE_NAME};

    /// Names as a generation's transaction gives them: every set and chain
    /// renamed, and an id for each set.
    struct GenerationNames;

    impl References for GenerationNames {
        fn named_set(&mut self, set: &str) -> Result<(String, Option<u32>), Error> {
            Ok((format!("{set}_g7"), Some(3)))
        }

        fn anonymous_set(&mut self, _: &AnonymousSet) -> Result<u32, Error> {
            Ok(9)
        }

        fn chain(&self, chain: &str) -> String {
            format!("{chain}_g7")
        }
    }

    /// The rule as the libnftnl path writes it, with the same names.
    fn libnftnl_bytes(chain: &str, comment: Option<&str>, plan: &[Expr]) -> Vec<u8> {
        let table_name = CString::new(TABLE_NAME).unwrap();
        let table = nftnl::Table::new(&table_name, ProtoFamily::Inet);
        let chain = nftnl::Chain::new(CString::new(chain).unwrap(), &table);
        let mut rule = nftnl::Rule::new(&chain);
        let mut names = GenerationNames;
        for expr in plan {
            match expr {
                Expr::Meta { key, dreg } => rule.add_expr(&reference::MetaLoad {
                    key: *key,
                    dreg: *dreg,
                }),
                Expr::Payload {
                    base,
                    offset,
                    len,
                    dreg,
                } => rule.add_expr(&reference::PayloadLoad {
                    base: *base,
                    offset: *offset,
                    len: *len,
                    dreg: *dreg,
                }),
                Expr::CmpEq(data) => rule.add_expr(&Cmp::new(CmpOp::Eq, data.as_slice())),
                Expr::CmpNeq(data) => rule.add_expr(&Cmp::new(CmpOp::Neq, data.as_slice())),
                Expr::Bitwise { mask, xor } => {
                    rule.add_expr(&Bitwise::new(mask.as_slice(), xor.as_slice()))
                }
                Expr::CtState => rule.add_expr(&Conntrack::State),
                Expr::Lookup { set, sreg } => {
                    let (set, set_id) = names.named_set(set).unwrap();
                    rule.add_expr(&reference::Lookup {
                        sreg: *sreg,
                        set: CString::new(set).unwrap(),
                        set_id,
                    })
                }
                Expr::LookupAnonymous(set) => {
                    let set_id = names.anonymous_set(set).unwrap();
                    rule.add_expr(&reference::Lookup {
                        sreg: libc::NFT_REG_1 as u32,
                        set: CString::new(ANONYMOUS_SET_NAME).unwrap(),
                        set_id: Some(set_id),
                    })
                }
                Expr::Counter => rule.add_expr(&Counter),
                Expr::Log { group, prefix } => rule.add_expr(&reference::Log {
                    group: *group,
                    prefix: CString::new(prefix.as_str()).unwrap(),
                }),
                Expr::Reject(RejectKind::TcpReset) => {
                    rule.add_expr(&Verdict::Reject(RejectionType::TcpRst))
                }
                Expr::Reject(RejectKind::IcmpxAdminProhibited) => rule.add_expr(&Verdict::Reject(
                    RejectionType::Icmp(IcmpCode::AdminProhibited),
                )),
                Expr::Accept => rule.add_expr(&Verdict::Accept),
                Expr::Drop => rule.add_expr(&Verdict::Drop),
                Expr::Jump(target) => rule.add_expr(&Verdict::Jump {
                    chain: CString::new(names.chain(target)).unwrap(),
                }),
                Expr::Immediate { dreg, data } => rule.add_expr(&reference::ImmediateData {
                    dreg: *dreg,
                    data: data.clone(),
                }),
                Expr::Redirect { sreg } => rule.add_expr(&reference::Redirect {
                    sreg_proto_min: *sreg,
                    flags: NF_NAT_RANGE_PROTO_SPECIFIED,
                }),
                Expr::CtSet { key, sreg } => rule.add_expr(&reference::CtSet {
                    key: *key,
                    sreg: *sreg,
                }),
            }
        }
        if let Some(comment) = comment {
            rule.set_comment(CString::new(comment).unwrap()).unwrap();
        }
        message_bytes(&rule)
    }

    fn written_bytes(chain: &str, comment: Option<&str>, plan: &[Expr]) -> Vec<u8> {
        let mut writer = RuleWriter::new(TABLE_NAME, chain, comment).unwrap();
        for expr in plan {
            writer.expression(expr, &mut GenerationNames).unwrap();
        }
        message_bytes(&writer.finish().unwrap())
    }

    /// Compares one rule, and returns the kinds of expression it holds.
    fn assert_same_bytes(chain: &str, comment: Option<&str>, plan: &[Expr]) -> Vec<String> {
        assert_eq!(
            written_bytes(chain, comment, plan),
            libnftnl_bytes(chain, comment, plan),
            "rule of {chain} ({comment:?}): {plan:?}"
        );
        plan.iter().map(kind).collect()
    }

    /// An expression's variant (and a reject's kind).
    fn kind(expr: &Expr) -> String {
        let text = format!("{expr:?}");
        match expr {
            Expr::Reject(_) => text,
            _ => text
                .split(|c: char| !c.is_alphanumeric())
                .next()
                .unwrap_or_default()
                .to_string(),
        }
    }

    #[test]
    fn every_expression_is_written_as_libnftnl_writes_it() {
        let every = crate::kernel::batch::one_of_each_expression();
        let kinds: BTreeSet<String> = every.iter().map(kind).collect();
        // Every variant once, each reject kind once.
        assert_eq!(kinds.len(), every.len());
        for expr in &every {
            assert_same_bytes("egress", Some("allowed-hosts"), std::slice::from_ref(expr));
        }
        // Data of a whole 16-byte register (an IPv6 address), into and
        // from a 32-bit register other than the first.
        let wide = [
            Expr::Payload {
                base: libc::NFT_PAYLOAD_NETWORK_HEADER as u32,
                offset: 24,
                len: 16,
                dreg: libc::NFT_REG32_01 as u32,
            },
            Expr::CmpNeq(vec![0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]),
        ];
        assert_same_bytes("egress", None, &wide);
        assert_same_bytes("egress", None, &every);
        assert_same_bytes("output", Some(&"c".repeat(COMMENT_BUFFER - 3)), &every);
    }

    #[test]
    fn every_rule_of_the_bundled_policies_is_written_as_libnftnl_writes_it() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/policies/examples");
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .collect();
        files.sort();
        assert!(files.len() >= 5, "the bundled policies in {dir}");
        let proxy = CompileOptions {
            resolvers: vec!["192.0.2.53".parse().unwrap()],
            proxy: Some(ProxyOptions {
                port: 5353,
                mark: 0x6e6c,
                upstreams: vec!["192.0.2.53:53".parse().unwrap()],
                zone: 7,
            }),
            ..CompileOptions::default()
        };
        let resolvers = CompileOptions {
            resolvers: vec![
                "192.0.2.53".parse().unwrap(),
                "2001:db8::53".parse().unwrap(),
            ],
            ..CompileOptions::default()
        };
        let mut kinds = BTreeSet::new();
        let mut rules = 0;
        for file in &files {
            let text = std::fs::read_to_string(file).unwrap();
            let origin = file.display().to_string();
            let policy = crate::policy::load(&text, &origin, &Expansions::default())
                .unwrap_or_else(|e| panic!("{origin}: {e}"));
            for options in [&CompileOptions::default(), &resolvers, &proxy] {
                let ruleset = crate::ruleset::compile(&policy, options);
                for chain in &ruleset.chains {
                    for rule in &chain.rules {
                        let comment = super::super::generation::entry_comment(
                            &rule.id,
                            chain.base.is_some().then_some(ruleset.digest.as_str()),
                        );
                        kinds.extend(assert_same_bytes(
                            &chain.name,
                            Some(&comment),
                            &plan_rule(rule),
                        ));
                        rules += 1;
                    }
                }
            }
        }
        assert!(rules > 100, "{rules} rules compared");
        // The compiler's rules use most kinds of expression (the rest are
        // compared in the test above).
        assert!(kinds.len() >= 10, "{kinds:?}");
    }

    #[test]
    fn a_comment_libnftnl_refuses_is_refused() {
        let long = "c".repeat(COMMENT_BUFFER - 2);
        assert!(matches!(
            RuleWriter::new(TABLE_NAME, "egress", Some(&long)),
            Err(Error::InvalidName { .. })
        ));
        let table = nftnl::Table::new(c"netleash", ProtoFamily::Inet);
        let chain = nftnl::Chain::new(c"egress", &table);
        let mut refused = nftnl::Rule::new(&chain);
        assert!(refused.set_comment(CString::new(long).unwrap()).is_err());
        assert!(matches!(
            RuleWriter::new(TABLE_NAME, "egr\0ess", None),
            Err(Error::InvalidName { .. })
        ));
    }
}
