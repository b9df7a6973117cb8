//! The API server itself refuses malformed WasmFilters (OpenAPI schema + CEL), and documents
//! every field for `kubectl explain`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::*;

fn filter(ns: &str, spec: &str) -> String {
    format!(
        "apiVersion: wasmfilter.dev/v1alpha1\nkind: WasmFilter\nmetadata: {{name: f, namespace: {ns}}}\nspec:\n{spec}"
    )
}

const VALID: &str = "  module: {image: \"registry.example.com/filters/add-header:1.2.0\"}\n  selector: {matchLabels: {app: web}}\n";

fn dry_run(yaml: &str) -> std::process::Output {
    kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], yaml)
}

#[test]
fn api_server_refuses_malformed_specs_with_a_clear_message() {
    let ns = TestNamespace::new("schema");
    let ok = dry_run(&filter(&ns.name, VALID));
    assert!(ok.status.success(), "valid spec refused: {}", stderr(&ok));
    let digest_ref = format!(
        "  module: {{image: \"oci://127.0.0.1:65535/f/a@sha256:{}\", sha256: \"{}\", pullSecret: regcred.v1}}\n  \
         selector: {{matchLabels: {{app.kubernetes.io/name: web, tier: \"\", x_Y.z-1: A.b_c-D}}}}\n  \
         match: [{{mode: SERVER, ports: [1, 65535]}}]\n  priority: -2147483648\n  rootId: \"my root é\"\n",
        "0".repeat(64),
        "a".repeat(64)
    );
    let ok = dry_run(&filter(&ns.name, &digest_ref));
    assert!(ok.status.success(), "valid spec refused: {}", stderr(&ok));
    let rollout = format!(
        "{VALID}  target: Ecds\n  rollout: {{maxFailures: 1, steps: [{{count: 1}}, {{percent: 50, pauseSeconds: 30}}]}}\n"
    );
    let ok = dry_run(&filter(&ns.name, &rollout));
    assert!(
        ok.status.success(),
        "valid rollout refused: {}",
        stderr(&ok)
    );

    let cases: &[(&str, String, &str)] = &[
        (
            "image that is not an OCI reference",
            VALID.replace(
                "registry.example.com/filters/add-header:1.2.0",
                "Not A Reference!",
            ),
            "must be an OCI reference",
        ),
        (
            "image with a short digest",
            VALID.replace(":1.2.0", "@sha256:abc"),
            "must be an OCI reference",
        ),
        (
            "sha256 that is not 64 hex characters",
            VALID.replace("1.2.0\"}", "1.2.0\", sha256: \"ABCDEF\"}"),
            "64 lowercase hex characters",
        ),
        (
            "unknown target",
            format!("{VALID}  target: Gateway\n"),
            "Unsupported value: \"Gateway\"",
        ),
        (
            "unknown phase",
            format!("{VALID}  phase: LATE\n"),
            "Unsupported value: \"LATE\"",
        ),
        (
            "unknown failure policy",
            format!("{VALID}  failurePolicy: Retry\n"),
            "Unsupported value: \"Retry\"",
        ),
        (
            "unknown type",
            format!("{VALID}  type: UDP\n"),
            "Unsupported value: \"UDP\"",
        ),
        (
            "unknown pull policy",
            VALID.replace("1.2.0\"}", "1.2.0\", pullPolicy: Never}"),
            "Unsupported value: \"Never\"",
        ),
        (
            "port 0",
            format!("{VALID}  match: [{{mode: SERVER, ports: [0]}}]\n"),
            "should be greater than or equal to 1",
        ),
        (
            "port 65536",
            format!("{VALID}  match: [{{mode: SERVER, ports: [65536]}}]\n"),
            "should be less than or equal to 65535",
        ),
        (
            "image port above 65535",
            VALID.replace("registry.example.com/", "registry.example.com:99999/"),
            "must be an OCI reference",
        ),
        (
            "priority outside int32",
            format!("{VALID}  priority: 3000000000\n"),
            "spec.priority: Invalid value: 3000000000: spec.priority in body should be less than or equal to 2147483647",
        ),
        (
            "selector value that is not a label value (a selector injection)",
            VALID.replace("{app: web}", "{app: \"web,tier=x\"}"),
            "spec.selector.matchLabels: Invalid value: values must be label values",
        ),
        (
            "selector value longer than 63 characters",
            VALID.replace("{app: web}", &format!("{{app: {}}}", "a".repeat(64))),
            "spec.selector.matchLabels.app: Too long",
        ),
        (
            "selector key that is not a label key",
            VALID.replace("{app: web}", "{\"app in (a)\": web}"),
            "spec.selector.matchLabels: Invalid value: keys must be label keys",
        ),
        (
            "selector key with an empty name",
            VALID.replace("{app: web}", "{\"example.com/\": web}"),
            "keys must be label keys",
        ),
        (
            "pullSecret that is not a Secret name",
            VALID.replace("1.2.0\"}", "1.2.0\", pullSecret: \"Reg Cred\"}"),
            "spec.module.pullSecret: Invalid value: \"Reg Cred\": must be a Secret name",
        ),
        (
            "rootId with a control character",
            format!("{VALID}  rootId: \"add\\nheader\"\n"),
            r#"spec.rootId: Invalid value: "add\nheader": must not contain control characters"#,
        ),
        (
            "duplicate ports",
            format!("{VALID}  match: [{{mode: SERVER, ports: [80, 443, 80]}}]\n"),
            "spec.match[0].ports[2]: Duplicate value: 80",
        ),
        (
            "empty selector",
            VALID.replace("{matchLabels: {app: web}}", "{matchLabels: {}}"),
            "must name at least one label",
        ),
        (
            "selector without matchLabels",
            VALID.replace("{matchLabels: {app: web}}", "{}"),
            "spec.selector.matchLabels: Required value",
        ),
        (
            "rollout for an Istio target",
            format!("{VALID}  rollout: {{steps: [{{count: 1}}]}}\n"),
            "spec.rollout needs target: Ecds",
        ),
        (
            "rollout step with both percent and count",
            format!("{VALID}  target: Ecds\n  rollout: {{steps: [{{count: 1, percent: 10}}]}}\n"),
            "name exactly one of percent or count",
        ),
        (
            "rollout step of 0 percent",
            format!("{VALID}  target: Ecds\n  rollout: {{steps: [{{percent: 0}}]}}\n"),
            "spec.rollout.steps[0].percent: Invalid value: 0",
        ),
        (
            "rollout without steps",
            format!("{VALID}  target: Ecds\n  rollout: {{steps: []}}\n"),
            "spec.rollout.steps: Invalid value",
        ),
        (
            "missing module",
            "  selector: {matchLabels: {app: web}}\n".to_string(),
            "spec.module: Required value",
        ),
    ];
    for (what, spec, expected) in cases {
        let out = dry_run(&filter(&ns.name, spec));
        assert!(
            !out.status.success(),
            "{what}: accepted but must be refused"
        );
        let err = stderr(&out);
        assert!(
            err.contains(expected),
            "{what}: expected {expected:?} in:\n{err}"
        );
    }
}

#[test]
fn kubectl_explain_documents_every_field() {
    env();
    let out = kubectl(&["explain", "wasmfilter.spec"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for field in [
        "module",
        "selector",
        "target",
        "rootId",
        "config",
        "phase",
        "priority",
        "failurePolicy",
        "type",
        "match",
        "onIncompatible",
        "rollout",
    ] {
        assert!(
            text.contains(&format!("  {field}\t")),
            "explain lacks spec.{field}:\n{text}"
        );
    }
    assert!(
        text.contains("Selects the pods whose proxies get the filter"),
        "{text}"
    );
    let out = kubectl(&["explain", "wasmfilter.spec.module"]);
    let text = stdout(&out);
    for field in ["image", "pullSecret", "pullPolicy", "sha256"] {
        assert!(
            text.contains(&format!("  {field}\t")),
            "explain lacks spec.module.{field}:\n{text}"
        );
    }
}
