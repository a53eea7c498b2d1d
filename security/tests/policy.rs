//! Trust policy: reading the `[trust]` table and admitting packages.

mod common;

use common::*;
use security::*;

#[derive(serde::Deserialize)]
struct Config {
    trust: TrustPolicy,
}

fn parse(toml_text: &str) -> Result<TrustPolicy, toml::de::Error> {
    toml::from_str::<Config>(toml_text).map(|c| c.trust)
}

fn verified() -> VerifiedPackage {
    package().verify().unwrap()
}

#[test]
fn default_trusts_no_author_and_no_peer_but_serves() {
    let policy = TrustPolicy::default();
    assert_eq!(
        policy.admit_package(&verified()),
        Err(PolicyError::UntrustedAuthor {
            author: Box::new(key(1).public())
        })
    );
    assert!(!policy.accepts_push_from(&key(2).public()));
    assert!(policy.serve_packages);
    // An empty table is the default.
    assert_eq!(parse("[trust]").unwrap(), policy);
}

#[test]
fn any_means_any() {
    let policy = parse("[trust]\nauthors = \"any\"\naccept_from = \"any\"\n").unwrap();
    assert_eq!(policy.authors, AuthorsPolicy::Any);
    let grant = policy.admit_package(&verified()).unwrap();
    assert_eq!(
        grant.capabilities,
        vec!["net".to_string(), "table:read".to_string()]
    );
    assert_eq!(grant.limits, manifest(key(1).public()).limits);
    assert!(policy.accepts_push_from(&key(9).public()));
}

#[test]
fn other_strings_than_any_are_errors() {
    let err = parse("[trust]\nauthors = \"all\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("any"), "{err}");
    assert!(parse("[trust]\naccept_from = \"everyone\"\n").is_err());
    assert!(parse("[trust]\nauthors = [\"ed25519:zz\"]\n").is_err());
    assert!(
        parse("[trust]\nauthours = \"any\"\n").is_err(),
        "unknown keys are refused"
    );
}

#[test]
fn a_bare_author_key_gets_no_capabilities() {
    let policy = parse(&format!("[trust]\nauthors = [\"{}\"]\n", key(1).public())).unwrap();
    assert!(policy.trusts_author(&key(1).public()));
    assert_eq!(
        policy.admit_package(&verified()),
        Err(PolicyError::CapabilityNotGranted {
            author: Box::new(key(1).public()),
            capability: "net".into()
        })
    );
    // A package asking for nothing is admitted.
    let author = key(1);
    let mut m = manifest(author.public());
    m.capabilities.clear();
    let p = Package::sign(m, "1".into(), &author)
        .unwrap()
        .verify()
        .unwrap();
    assert!(policy.admit_package(&p).is_ok());
}

#[test]
fn a_grant_table_grants_capabilities_and_caps_limits() {
    let text = format!(
        r#"
        [trust]
        authors = [
            "{other}",
            {{ key = "{author}", capabilities = ["net", "table:read", "extra"], limits = {{ max_operations = 20000, max_call_depth = 8 }} }},
        ]
        accept_from = ["{peer_id}", "{peer_key}"]
        serve_packages = false
        "#,
        other = key(2).public(),
        author = key(1).public(),
        peer_id = key(3).public().peer_id_string(),
        peer_key = key(4).public(),
    );
    let policy = parse(&text).unwrap();
    assert!(!policy.serve_packages);
    assert!(policy.accepts_push_from(&key(3).public()));
    assert!(policy.accepts_push_from(&key(4).public()));
    assert!(!policy.accepts_push_from(&key(5).public()));
    let grant = policy.admit_package(&verified()).unwrap();
    assert_eq!(grant.author, key(1).public());
    assert_eq!(
        grant.capabilities,
        vec!["net".to_string(), "table:read".to_string()]
    );
    assert_eq!(
        grant.limits.max_operations,
        Some(10_000),
        "the package asked for less"
    );
    assert_eq!(
        grant.limits.max_call_depth,
        Some(8),
        "the cap fills an unstated limit"
    );
    assert_eq!(
        grant.limits.max_continuation_bytes,
        Some(1 << 20),
        "no cap: as asked"
    );
}

#[test]
fn asking_for_more_than_the_cap_is_refused() {
    let text = format!(
        "[trust]\nauthors = [{{ key = \"{}\", capabilities = \"any\", limits = {{ max_operations = 100 }} }}]\n",
        key(1).public()
    );
    let policy = parse(&text).unwrap();
    assert_eq!(
        policy.admit_package(&verified()),
        Err(PolicyError::LimitExceeded {
            limit: "max_operations",
            requested: 10_000,
            allowed: 100
        })
    );
}

#[test]
fn policy_round_trips_through_toml() {
    let policy = TrustPolicy {
        authors: AuthorsPolicy::List(vec![AuthorGrant {
            key: key(1).public(),
            capabilities: Capabilities::Any,
            limits: PackageLimits {
                max_operations: Some(3),
                ..PackageLimits::default()
            },
            resources: ResourceGrants::Named(
                [
                    ("shard".to_string(), Access::Read),
                    ("counts".to_string(), Access::ReadWrite),
                ]
                .into(),
            ),
        }]),
        accept_from: PeersPolicy::Any,
        serve_packages: true,
        operators: vec![key(2).public()],
    };
    let text = toml::to_string(&policy).unwrap();
    assert_eq!(
        toml::from_str::<TrustPolicy>(&text).unwrap(),
        policy,
        "{text}"
    );
}

#[test]
fn only_listed_keys_operate_a_node() {
    let policy: TrustPolicy = toml::from_str(&format!(
        "operators = [\"{}\", \"{}\"]",
        key(1).public(),
        key(2).public().peer_id_string()
    ))
    .unwrap();
    assert!(policy.is_operator(&key(1).public()));
    assert!(
        policy.is_operator(&key(2).public()),
        "a peer id names an operator too"
    );
    assert!(!policy.is_operator(&key(3).public()));
    assert!(!TrustPolicy::default().is_operator(&key(1).public()));
    assert!(toml::from_str::<TrustPolicy>("operators = \"any\"").is_err());
}

/// A limit of 0, which Rhai reads as "no limit", is asking for nothing: the grant's cap holds.
#[test]
fn asking_for_a_zero_limit_gets_the_cap() {
    let author = key(1);
    let mut manifest = manifest(author.public());
    manifest.limits.max_operations = Some(0);
    let package = Package::sign(manifest, "1".into(), &author)
        .unwrap()
        .verify()
        .unwrap();
    let policy = parse(&format!(
        r#"
        [trust]
        authors = [{{ key = "{}", capabilities = "any", limits = {{ max_operations = 20000 }} }}]
        "#,
        author.public()
    ))
    .unwrap();
    let grant = policy.admit_package(&package).unwrap();
    assert_eq!(grant.limits.max_operations, Some(20_000));
}

#[test]
fn resource_grants_are_none_unless_stated_and_any_for_any_author() {
    let author = key(1).public();
    let package = package().verify().unwrap();
    let policy_with = |resources: &str| {
        toml::from_str::<TrustPolicy>(&format!(
            r#"authors = [{{ key = "{author}", capabilities = "any"{resources} }}]"#
        ))
    };
    let none = policy_with("").unwrap();
    assert_eq!(
        none.admit_package(&package)
            .unwrap()
            .resources
            .access("table"),
        None
    );
    let named = policy_with(r#", resources = { table = "read", log = "read-write" }"#).unwrap();
    let grant = named.admit_package(&package).unwrap();
    assert_eq!(grant.resources.access("table"), Some(Access::Read));
    assert_eq!(grant.resources.access("log"), Some(Access::ReadWrite));
    assert_eq!(grant.resources.access("other"), None);
    let any: TrustPolicy = toml::from_str(r#"authors = "any""#).unwrap();
    assert_eq!(
        any.admit_package(&package).unwrap().resources.access("x"),
        Some(Access::ReadWrite)
    );
    for bad in [r#", resources = "all""#, r#", resources = { a = "write" }"#] {
        assert!(policy_with(bad).is_err(), "{bad}");
    }
}
