use std::collections::BTreeMap;

use super::*;

fn parse(pairs: &[(&str, &str)]) -> Result<Vec<Reference>, Vec<String>> {
    let map: BTreeMap<String, String> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    parse_annotations(&map, "global").map_err(|e| e.into_iter().map(|e| e.to_string()).collect())
}

fn one_error(pairs: &[(&str, &str)]) -> String {
    let errors = parse(pairs).unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:?}");
    errors.into_iter().next().unwrap()
}

fn obj(kind: SourceType, id: &str, key: &str) -> SecretObject {
    SecretObject {
        key: key.into(),
        source: Source {
            kind,
            id: id.into(),
        },
    }
}

#[test]
fn json_items_are_the_seeds_envsecrets_shape() {
    let refs = parse(&[(
        ENV_SECRETS,
        r#"[{"key":"DB_PASSWORD","secretObject":{"key":"db_password","source":{"type":"KUBERNETES","id":"finance"}}},
            {"key":"API_TOKEN","secretObject":{"key":"api/token#value","source":{"type":"VAULT","id":"vault-prod"}}}]"#,
    )])
    .unwrap();
    assert_eq!(refs.len(), 2);
    assert_eq!(refs[0].name, "API_TOKEN");
    assert_eq!(
        refs[0].secret,
        obj(SourceType::Vault, "vault-prod", "api/token#value")
    );
    assert_eq!(refs[1].kind, TargetKind::Env);
    assert_eq!(refs[1].secret.to_string(), "kubernetes:finance/db_password");
    assert_eq!(refs[1].origin, ENV_SECRETS);
}

#[test]
fn spark_conf_items_and_short_forms() {
    let refs = parse(&[
        (
            SPARK_CONF_SECRETS,
            r#"[{"key":"spark.hadoop.fs.s3a.secret.key","secretObject":{"key":"s3","source":{"type":"KUBERNETES","id":"global"}}}]"#,
        ),
        ("env.secrets.iomete.com/DB_PASSWORD", "kubernetes:finance/db_password"),
        ("spark-conf.secrets.iomete.com/spark.sql.token", "VAULT:vault-prod-finance/sub/path#field"),
        ("unrelated/annotation", "whatever"),
    ])
    .unwrap();
    let short: Vec<String> = refs
        .iter()
        .map(|r| format!("{} {} {}", r.kind, r.name, r.secret))
        .collect();
    assert_eq!(
        short,
        [
            "env var DB_PASSWORD kubernetes:finance/db_password",
            "Spark conf spark.hadoop.fs.s3a.secret.key kubernetes:global/s3",
            "Spark conf spark.sql.token vault:vault-prod-finance/sub/path#field",
        ]
    );
}

#[test]
fn identical_duplicates_collapse_and_conflicts_are_denied() {
    let item =
        r#"[{"key":"X","secretObject":{"key":"k","source":{"type":"KUBERNETES","id":"finance"}}}]"#;
    let refs = parse(&[
        (ENV_SECRETS, item),
        ("env.secrets.iomete.com/X", "kubernetes:finance/k"),
    ])
    .unwrap();
    assert_eq!(refs.len(), 1);
    assert_eq!(
        one_error(&[
            (ENV_SECRETS, item),
            ("env.secrets.iomete.com/X", "kubernetes:finance/other")
        ]),
        "annotation env.secrets.iomete.com/X: env var \"X\": referenced twice, as kubernetes:finance/k \
         (in secrets.iomete.com/env-secrets) and as kubernetes:finance/other; keep one reference per name"
    );
}

#[test]
fn malformed_json_items_name_the_annotation_item_and_fix() {
    let fix = r#"write a JSON array like [{"key":"NAME","secretObject":{"key":"secret_key","source":{"type":"KUBERNETES","id":"my-domain"}}}]"#;
    assert_eq!(
        one_error(&[(ENV_SECRETS, "not json")]),
        format!(
            "annotation secrets.iomete.com/env-secrets: not a JSON array of references (expected ident at line 1 column 2); {fix}"
        )
    );
    assert_eq!(
        one_error(&[(ENV_SECRETS, r#"{"key":"X"}"#)]),
        format!(
            "annotation secrets.iomete.com/env-secrets: not a JSON array of references (invalid type: map, expected a sequence at line 1 column 0); {fix}"
        )
    );
    assert_eq!(
        one_error(&[(
            ENV_SECRETS,
            r#"[{"key":"X","secretObject":{"key":"k","source":{"type":"S3","id":"d"}}}]"#
        )]),
        format!(
            "annotation secrets.iomete.com/env-secrets: item 0: an unknown variant, expected `KUBERNETES` or `VAULT`; {fix}"
        )
    );
    assert_eq!(
        one_error(&[(ENV_SECRETS, r#"[{"key":"X","secretobject":{}}]"#)]),
        format!(
            "annotation secrets.iomete.com/env-secrets: item 0: an unknown field, expected `key` or `secretObject`; {fix}"
        )
    );
    assert_eq!(
        one_error(&[(ENV_SECRETS, r#"[{"key":"X"}]"#)]),
        format!(
            "annotation secrets.iomete.com/env-secrets: item 0: missing field `secretObject`; {fix}"
        )
    );
}

#[test]
fn invalid_fields_are_denied_with_the_reference_and_the_fix() {
    let item = |name: &str, kind: &str, id: &str, key: &str| {
        format!(
            r#"[{{"key":"{name}","secretObject":{{"key":"{key}","source":{{"type":"{kind}","id":"{id}"}}}}}}]"#
        )
    };
    let cases = [
        (
            item("X", "KUBERNETES", "finance", ""),
            "item 0: env var \"X\": kubernetes:finance/: the key is empty; name the secret's key",
        ),
        (
            item("X", "KUBERNETES", "", "k"),
            "item 0: env var \"X\": source.id is empty; name a domain, \"global\" or a Vault config",
        ),
        (
            item("X", "KUBERNETES", "Finance_1", "k"),
            "item 0: env var \"X\": source.id (a value of 9 characters: letters, digits, punctuation) is not a valid name; domains and Vault configs are lowercase letters, digits and '-' (at most 63)",
        ),
        (
            item("1X", "KUBERNETES", "finance", "k"),
            "item 0: env var name (a value of 2 characters: letters, digits): is not a valid environment variable name; use letters, digits, '_', '-' or '.', not starting with a digit",
        ),
        (
            item("X", "KUBERNETES", "finance", "a/b"),
            "item 0: env var \"X\": kubernetes:finance/…: the key (a value of 3 characters: letters, punctuation) is not a valid Kubernetes secret key; Kubernetes store keys use letters, digits, '.', '_' or '-'",
        ),
        (
            item("X", "VAULT", "cfg", "../etc#f"),
            "item 0: env var \"X\": vault:cfg/…: the key (a value of 8 characters: letters, punctuation) is not a valid Vault key; write <field> or <sub/path>#<field>, without '.' or '..' path segments",
        ),
        (
            item("X", "VAULT", "global", "k"),
            "item 0: env var \"X\": vault:global/k: the global store is a Kubernetes source; use kubernetes:global/<key>, or name a Vault config",
        ),
    ];
    for (value, expected) in cases {
        assert_eq!(
            one_error(&[(ENV_SECRETS, &value)]),
            format!("annotation secrets.iomete.com/env-secrets: {expected}")
        );
    }
    let conf = r#"[{"key":"hive.password","secretObject":{"key":"k","source":{"type":"KUBERNETES","id":"finance"}}}]"#;
    assert_eq!(
        one_error(&[(SPARK_CONF_SECRETS, conf)]),
        "annotation secrets.iomete.com/spark-conf-secrets: item 0: Spark conf name (a value of 13 characters: letters, punctuation): is not a Spark conf key; \
         Spark only reads keys that start with \"spark.\" and use letters, digits, '.', '_' or '-'"
    );
}

#[test]
fn malformed_short_forms_never_quote_the_value() {
    let fix = "write it as kubernetes:<domain>/<key>, kubernetes:global/<key> or vault:<vault-config>/<key>";
    for (value, problem) in [
        ("hunter2", "the value is not of the form <type>:<id>/<key>"),
        (
            "s3:hunter2/x",
            "the source type is not \"kubernetes\" or \"vault\"",
        ),
        (
            "vault:hunter2",
            "the value is not of the form <type>:<id>/<key>",
        ),
    ] {
        let error = one_error(&[("env.secrets.iomete.com/X", value)]);
        assert_eq!(
            error,
            format!("annotation env.secrets.iomete.com/X: {problem}; {fix}")
        );
        assert!(!error.contains("hunter2"));
    }
}

#[test]
fn every_problem_is_reported_not_only_the_first() {
    let errors = parse(&[
        ("env.secrets.iomete.com/A", "bad"),
        ("env.secrets.iomete.com/B", "kubernetes:finance/"),
        (ENV_SECRETS, "[]"),
    ])
    .unwrap_err();
    assert_eq!(errors.len(), 2);
}

#[test]
fn long_input_is_clipped_in_messages() {
    let name = "A".repeat(10_000);
    let error = one_error(&[(
        &format!("env.secrets.iomete.com/{name}"),
        "kubernetes:finance/k k",
    )]);
    assert!(error.len() < 400, "{}", error.len());
}

/// Found by the `refs_grammar` fuzz target: an invalid key was quoted whole, so one annotation
/// could make a denial of any size. Now an invalid key is never quoted at all (attack: a value
/// pasted where a key belongs came back in the denial and the log).
#[test]
fn an_invalid_key_of_any_length_is_described_not_quoted() {
    let key = "x y".repeat(100_000);
    for value in [
        format!("kubernetes:global/{key}"),
        format!("vault:cfg/{key}"),
    ] {
        let error = one_error(&[("env.secrets.iomete.com/X", &value)]);
        assert!(error.len() < 400, "{}", error.len());
        assert!(!error.contains("x y"), "{error}");
        assert!(
            error.contains("the key (a value of 300000 characters: letters, whitespace)"),
            "{error}"
        );
    }
}

/// Attack: a secret pasted where a name or a reference belongs is echoed in the denial (and the
/// log line that records it). Every field that fails validation is described by its shape.
#[test]
fn pasted_values_are_never_echoed() {
    let pasted = "Pa55w0rd!s3cr3t";
    let json = |name: &str, kind: &str, id: &str, key: &str| {
        serde_json::json!([{"key": name, "secretObject": {"key": key, "source": {"type": kind, "id": id}}}])
            .to_string()
    };
    let cases = [
        (
            ENV_SECRETS.to_string(),
            json(pasted, "KUBERNETES", "finance", "k"),
        ),
        (
            ENV_SECRETS.to_string(),
            json("X", "KUBERNETES", pasted, "k"),
        ),
        (
            ENV_SECRETS.to_string(),
            json("X", "KUBERNETES", "finance", pasted),
        ),
        (
            ENV_SECRETS.to_string(),
            json("X", "VAULT", "cfg", &format!("{pasted} x")),
        ),
        (ENV_SECRETS.to_string(), json("X", pasted, "finance", "k")),
        (
            SPARK_CONF_SECRETS.to_string(),
            json(pasted, "KUBERNETES", "finance", "k"),
        ),
        (
            ENV_SECRETS.to_string(),
            format!(r#"[{{"key":"X","{pasted}":1}}]"#),
        ),
        (
            format!("env.secrets.iomete.com/{pasted}"),
            "kubernetes:finance/k".to_string(),
        ),
        (
            format!("spark-conf.secrets.iomete.com/{pasted}"),
            "kubernetes:finance/k".to_string(),
        ),
        (
            "env.secrets.iomete.com/X".to_string(),
            format!("kubernetes:finance/{pasted}"),
        ),
        (
            "env.secrets.iomete.com/X".to_string(),
            format!("kubernetes:{pasted}/k"),
        ),
        ("env.secrets.iomete.com/X".to_string(), pasted.to_string()),
    ];
    for (annotation, value) in cases {
        let error = one_error(&[(&annotation, &value)]);
        assert!(!error.contains(pasted), "{annotation}: {error}");
        assert!(!error.contains("Pa55"), "{annotation}: {error}");
    }
    assert!(
        !split_placeholders(&format!("${{secrets.{pasted}}}"))
            .unwrap_err()
            .to_string()
            .contains("Pa55")
    );
}

/// Found by the `refs_grammar` fuzz target: serde quotes the strings it rejects, so a value pasted
/// where a reference belongs came back in the denial (and unbounded).
#[test]
fn json_problems_never_quote_strings() {
    let fix = r#"write a JSON array like [{"key":"NAME","secretObject":{"key":"secret_key","source":{"type":"KUBERNETES","id":"my-domain"}}}]"#;
    assert_eq!(
        one_error(&[(
            ENV_SECRETS,
            r#"[{"key":"X","secretObject":"hunter2 \" pasted"}]"#
        )]),
        format!(
            "annotation secrets.iomete.com/env-secrets: item 0: invalid type: a string, expected struct SecretObject; {fix}"
        )
    );
    let error = one_error(&[(ENV_SECRETS, &format!("{:?}", "hunter2".repeat(10_000)))]);
    assert!(!error.contains("hunter2"), "{error}");
    assert!(error.len() < 600, "{}", error.len());
    let field = "f".repeat(10_000);
    let error = one_error(&[(ENV_SECRETS, &format!(r#"[{{"key":"X","{field}":1}}]"#))]);
    assert!(error.len() < 600, "{}", error.len());
}

#[test]
fn placeholders_split_and_escape_like_the_kubelet() {
    use Piece::*;
    assert_eq!(
        split_placeholders("${secrets.db}").unwrap(),
        [Placeholder("db")]
    );
    assert_eq!(
        split_placeholders("jdbc://u:${secrets.pw}@h/$(DB)?x=${secrets.t}").unwrap(),
        [
            Text("jdbc://u:"),
            Placeholder("pw"),
            Text("@h/$(DB)?x="),
            Placeholder("t")
        ]
    );
    assert_eq!(
        split_placeholders("$${secrets.db}").unwrap(),
        [Text("$${secrets.db}")]
    );
    assert_eq!(
        split_placeholders("$$$${secrets.db}x").unwrap(),
        [Text("$$$${secrets.db}x")]
    );
    assert_eq!(
        split_placeholders("cost $5 ${secrets.a}").unwrap(),
        [Text("cost $5 "), Placeholder("a")]
    );
    assert_eq!(
        split_placeholders("${secrets.db"),
        Err(PlaceholderError::Unterminated)
    );
    assert_eq!(
        split_placeholders("${secrets.a b}"),
        Err(PlaceholderError::BadKey(
            "a value of 3 characters: letters, whitespace".into()
        ))
    );
    assert_eq!(
        split_placeholders("${secrets.}"),
        Err(PlaceholderError::BadKey("an empty value".into()))
    );
    assert!(!has_placeholder("${other.x} $(X)"));
}
