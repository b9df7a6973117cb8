//! Signed modules: the real `cosign` CLI (built from its Go module) signs modules in the local
//! registry with keys it generates (`cosign sign --key`, its `sha256-<digest>.sig` tag scheme);
//! `wasmfilter verify` and the operator verify them, and refuse what cosign itself refuses;
//! `wasmfilter push --sign` signs with cosign's keys, and `cosign verify` accepts what it wrote.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::*;
use wasmfilter::api::{CosignVerification, KeySource, PullPolicy, Verification, WasmFilter};

fn cosign() -> PathBuf {
    std::env::var("WASMFILTER_COSIGN")
        .expect(
            "WASMFILTER_COSIGN is not set: e2e/env.sh exports it after e2e/setup.sh built cosign",
        )
        .into()
}

/// A key pair cosign generates (no password): the private key and the public key's path.
fn key_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let out = Command::new(cosign())
        .args(["generate-key-pair", "--output-key-prefix", name])
        .current_dir(dir)
        .env("COSIGN_PASSWORD", "")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    (
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.pub")),
    )
}

/// `cosign sign --key` on `image@digest` (no transparency log: nothing leaves the machine).
fn cosign_sign(key: &Path, image_at_digest: &str) {
    cosign_sign_with(key, image_at_digest, &[]);
}

/// `cosign sign --key` with more arguments (a certificate, the bundle format).
fn cosign_sign_with(key: &Path, image_at_digest: &str, extra: &[&std::ffi::OsStr]) {
    let out = Command::new(cosign())
        .args(["sign", "--key"])
        .arg(key)
        .args(extra)
        .args([
            "--tlog-upload=false",
            "--allow-http-registry",
            "-y",
            image_at_digest,
        ])
        .env("COSIGN_PASSWORD", "")
        .output()
        .unwrap();
    assert!(out.status.success(), "cosign sign: {}", stderr(&out));
}

/// Whether `cosign verify --key` accepts `image`.
fn cosign_verifies(public: &Path, image: &str) -> bool {
    cosign_verifies_with(image, &["--key".as_ref(), public.as_os_str()])
}

/// Whether `cosign verify` with these arguments accepts `image` (never asking a transparency
/// log: nothing leaves the machine).
fn cosign_verifies_with(image: &str, args: &[&std::ffi::OsStr]) -> bool {
    Command::new(cosign())
        .arg("verify")
        .args(args)
        .args([
            "--insecure-ignore-tlog=true",
            "--allow-http-registry",
            image,
        ])
        .output()
        .unwrap()
        .status
        .success()
}

fn verify(image: &str, public: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_wasmfilter"))
        .args(["verify", image, "--plain-http", "--key"])
        .arg(public)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        stdout(&out) + &stderr(&out),
    )
}

fn sig_tag(digest: &str) -> String {
    digest.replacen(':', "-", 1) + ".sig"
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_agrees_with_cosign_on_signed_unsigned_misdirected_and_altered_modules() {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = key_pair(dir.path(), "team");
    let (_, other) = key_pair(dir.path(), "other");
    let repo = format!("sig/cli-{:08x}", fastrand::u32(..));
    let signed = format!("{}/{repo}:signed", env.registry);
    let digest = push_module(&signed, module("signed")).await;
    cosign_sign(&key, &format!("{}/{repo}@{digest}", env.registry));

    let (code, out) = verify(&signed, &public);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("@{digest}: signed by {}", public.display())),
        "{out}"
    );
    assert!(cosign_verifies(&public, &signed));

    let (code, out) = verify(&signed, &other);
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("SignerNotTrusted: "), "{out}");
    assert!(!cosign_verifies(&other, &signed));

    let unsigned = format!("{}/{repo}:unsigned", env.registry);
    let unsigned_digest = push_module(&unsigned, module("unsigned")).await;
    let (code, out) = verify(&unsigned, &public);
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("SignatureMissing: "), "{out}");
    assert!(!cosign_verifies(&public, &unsigned));

    // The signed module's signature, placed under the unsigned one's signature tag: a valid
    // signature, of another manifest.
    let signature = get_manifest_bytes(&env.registry, &repo, &sig_tag(&digest)).await;
    put_manifest(
        &env.registry,
        &repo,
        &sig_tag(&unsigned_digest),
        OCI_MANIFEST,
        signature.clone(),
    )
    .await;
    let (code, out) = verify(&unsigned, &public);
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("SignatureInvalid: "), "{out}");
    assert!(out.contains(&format!("a payload signs {digest}")), "{out}");
    assert!(!cosign_verifies(&public, &unsigned));

    // The signature altered: the annotation swapped for one over other bytes.
    let mut manifest: serde_json::Value = serde_json::from_slice(&signature).unwrap();
    let annotation =
        &mut manifest["layers"][0]["annotations"]["dev.cosignproject.cosign/signature"];
    let original = annotation.as_str().unwrap().to_string();
    let mut altered = original.clone().into_bytes();
    let i = altered.len() / 2;
    altered[i] = if altered[i] == b'A' { b'B' } else { b'A' };
    *annotation = json!(String::from_utf8(altered).unwrap());
    put_manifest(
        &env.registry,
        &repo,
        &sig_tag(&digest),
        OCI_MANIFEST,
        manifest.to_string().into_bytes(),
    )
    .await;
    let (code, out) = verify(&signed, &public);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("SignerNotTrusted: ") || out.starts_with("SignatureInvalid: "),
        "{out}"
    );
    assert!(!cosign_verifies(&public, &signed));

    let (code, out) = verify(&signed, Path::new("/nonexistent.pub"));
    assert_eq!(code, 2, "{out}");
}

fn verifying(keys: KeySource) -> impl FnOnce(&mut wasmfilter::api::WasmFilterSpec) {
    move |spec| {
        spec.module.verify = Some(Verification {
            cosign: CosignVerification {
                public_keys: Some(keys),
                keyless: None,
            },
        })
    }
}

fn config_map(name: &str) -> KeySource {
    KeySource {
        config_map: Some(name.into()),
        secret: None,
    }
}

fn key_config_map(ns: &str, name: &str, public: &Path) {
    let out = kubectl(&[
        "create",
        "configmap",
        name,
        "-n",
        ns,
        &format!("--from-file=cosign.pub={}", public.display()),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
}

fn reason_is(wf: &WasmFilter, reason: &str) -> bool {
    condition(wf, "Ready").is_some_and(|c| c.status == "False" && c.reason == reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_deploys_only_modules_signed_by_a_trusted_key() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("signed");
    let n = &ns.name;
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = key_pair(dir.path(), "team");
    let (_, other) = key_pair(dir.path(), "other");
    key_config_map(n, "team-keys", &public);
    key_config_map(n, "other-keys", &other);
    // A short resync, so that the moved tag is looked at soon.
    let _op = Operator::start(n, &["--resync-seconds", "2"]).await;
    let image = format!("{}/sig/{n}:1", env.registry);
    let repo = format!("sig/{n}");
    let first = module(&format!("first-{n}"));
    let digest = push_module(&image, first.clone()).await;
    let filter = || {
        Filter::new(n, "signed", &image)
            .pull_policy(PullPolicy::Always)
            .edit(verifying(config_map("team-keys")))
    };

    // Unsigned: nothing deployed, and said why.
    filter().apply();
    let wf = wait_status(&client, n, "signed", "SignatureMissing", |wf| {
        reason_is(wf, "SignatureMissing")
    })
    .await;
    let msg = &condition(&wf, "Ready").unwrap().message;
    assert!(msg.contains(&sig_tag(&digest)), "{msg}");
    assert!(
        child_api(&client, n, "WasmPlugin")
            .get_opt("signed")
            .await
            .unwrap()
            .is_none(),
        "nothing deployed before a signature verifies"
    );
    assert!(
        warning_events(n, "signed")
            .iter()
            .any(|(reason, _)| reason == "SignatureMissing")
    );

    // Signed after the fact: picked up on the retry.
    cosign_sign(&key, &format!("{}/{repo}@{digest}", env.registry));
    let sha = wasmfilter::cache::sha256_hex(&first);
    let wf = wait_module(&client, n, "signed", &sha).await;
    let signature = wf.status.unwrap().artifact.unwrap().signature.unwrap();
    assert_eq!(signature.scheme, "cosign");
    assert_eq!(
        signature.key,
        format!("ConfigMap {n}/team-keys key cosign.pub")
    );
    assert!(signature.key_fingerprint.starts_with("sha256:"));
    let signature_manifest = get_manifest_bytes(&env.registry, &repo, &sig_tag(&digest)).await;
    assert_eq!(
        signature.signature_digest,
        format!(
            "sha256:{}",
            wasmfilter::cache::sha256_hex(&signature_manifest)
        )
    );

    // The tag moves to an unsigned module: refused, and the signed one keeps running.
    push_module(&image, module(&format!("second-{n}"))).await;
    wait_status(&client, n, "signed", "the moved tag refused", |wf| {
        reason_is(wf, "SignatureMissing")
    })
    .await;
    let wp = child_api(&client, n, "WasmPlugin")
        .get("signed")
        .await
        .unwrap();
    assert_eq!(wp.data["spec"]["sha256"], sha);

    // Trusting another key: the signature is there, but not by it.
    push_module(&image, first.clone()).await;
    filter().edit(verifying(config_map("other-keys"))).apply();
    let wf = wait_status(&client, n, "signed", "SignerNotTrusted", |wf| {
        reason_is(wf, "SignerNotTrusted")
    })
    .await;
    let msg = &condition(&wf, "Ready").unwrap().message;
    assert!(msg.contains("other-keys"), "{msg}");

    // Keys that are not there.
    filter().edit(verifying(config_map("no-such-keys"))).apply();
    let wf = wait_status(&client, n, "signed", "VerificationKeysNotFound", |wf| {
        reason_is(wf, "VerificationKeysNotFound")
    })
    .await;
    let msg = &condition(&wf, "Ready").unwrap().message;
    assert!(
        msg.contains(&format!("ConfigMap {n}/no-such-keys")),
        "{msg}"
    );
    let wp = child_api(&client, n, "WasmPlugin")
        .get("signed")
        .await
        .unwrap();
    assert_eq!(
        wp.data["spec"]["sha256"], sha,
        "the signed module still deployed"
    );
    let events = warning_events(n, "signed");
    for reason in ["SignerNotTrusted", "VerificationKeysNotFound"] {
        assert!(
            events.iter().any(|(r, _)| r == reason),
            "{reason}: {events:?}"
        );
    }

    // The keys created afterwards: picked up on the retry.
    key_config_map(n, "no-such-keys", &public);
    let wf = wait_condition(&client, n, "signed", "Ready", "True").await;
    let signature = wf.status.unwrap().artifact.unwrap().signature.unwrap();
    assert_eq!(
        signature.key,
        format!("ConfigMap {n}/no-such-keys key cosign.pub")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_can_require_signatures_of_every_filter() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("platform-keys");
    let n = &ns.name;
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = key_pair(dir.path(), "platform");
    key_config_map(n, "platform", &public);
    let _op = Operator::start(n, &["--require-signature-keys", &format!("{n}/platform")]).await;
    let image = format!("{}/sig/{n}:1", env.registry);
    let m = module(&format!("platform-{n}"));
    let digest = push_module(&image, m.clone()).await;

    // The filter says nothing about signatures; the operator requires one anyway.
    Filter::new(n, "free", &image)
        .pull_policy(PullPolicy::Always)
        .apply();
    wait_status(&client, n, "free", "SignatureMissing", |wf| {
        reason_is(wf, "SignatureMissing")
    })
    .await;
    cosign_sign(&key, &format!("{}/sig/{n}@{digest}", env.registry));
    let wf = wait_module(&client, n, "free", &wasmfilter::cache::sha256_hex(&m)).await;
    let signature = wf.status.unwrap().artifact.unwrap().signature.unwrap();
    assert_eq!(
        signature.key,
        format!("ConfigMap {n}/platform key cosign.pub")
    );
}

#[test]
fn the_api_server_refuses_a_key_source_naming_both_or_neither_or_a_bad_name() {
    let ns = TestNamespace::new("sig-schema");
    for (keys, says) in [
        (
            json!({"configMap": "a", "secret": "b"}),
            "name exactly one of configMap or secret",
        ),
        (json!({}), "name exactly one of configMap or secret"),
        (
            json!({"configMap": "Not_A_Name"}),
            "must be a ConfigMap name",
        ),
    ] {
        let mut wf = Filter::new(&ns.name, "keys", "registry.example/f:1").json();
        wf["spec"]["module"]["verify"] = json!({"cosign": {"publicKeys": keys}});
        let out = kubectl_apply(&wf.to_string());
        assert!(!out.status.success());
        assert!(stderr(&out).contains(says), "{}", stderr(&out));
    }
    let keyless = json!({"trustedRoot": "sigstore-root", "identities": [{"issuer": "https://i", "subject": "dev@example.com"}]});
    for (cosign, says) in [
        (
            json!({"publicKeys": {"configMap": "a"}, "keyless": keyless}),
            "name exactly one of publicKeys or keyless",
        ),
        (json!({}), "name exactly one of publicKeys or keyless"),
        (
            json!({"keyless": {"trustedRoot": "sigstore-root", "identities": []}}),
            "spec.module.verify.cosign.keyless.identities: Invalid value",
        ),
    ] {
        let mut wf = Filter::new(&ns.name, "keys", "registry.example/f:1").json();
        wf["spec"]["module"]["verify"] = json!({ "cosign": cosign });
        let out = kubectl_apply(&wf.to_string());
        assert!(!out.status.success());
        assert!(stderr(&out).contains(says), "{}", stderr(&out));
    }
    let mut wf = Filter::new(&ns.name, "keys", "registry.example/f:1").json();
    wf["spec"]["module"]["verify"] = json!({"cosign": {"keyless": keyless}});
    let out = kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], &wf.to_string());
    assert!(out.status.success(), "{}", stderr(&out));
}

/// `wasmfilter push FILE REF --sign --key KEY` with `COSIGN_PASSWORD` set to `password`.
fn push_signed(file: &Path, image: &str, key: &Path, password: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_wasmfilter"))
        .args(["push"])
        .arg(file)
        .args([image, "--plain-http", "--sign", "--key"])
        .arg(key)
        .env("COSIGN_PASSWORD", password)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_sign_writes_signatures_cosign_verifies_and_keeps_the_others() {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    // A cosign key with a password, as `cosign generate-key-pair` writes it.
    let out = Command::new(cosign())
        .args(["generate-key-pair", "--output-key-prefix", "ours"])
        .current_dir(dir.path())
        .env("COSIGN_PASSWORD", "s3cret")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let (key, public) = (dir.path().join("ours.key"), dir.path().join("ours.pub"));
    let (their_key, their_public) = key_pair(dir.path(), "theirs");
    let file = dir.path().join("m.wasm");
    std::fs::write(&file, module("pushed and signed")).unwrap();
    let repo = format!("sig/push-{:08x}", fastrand::u32(..));
    let image = format!("{}/{repo}:v1", env.registry);

    // A wrong password pushes nothing.
    let out = push_signed(&file, &image, &key, "wrong");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("does not open with this password (set COSIGN_PASSWORD"),
        "{}",
        stderr(&out)
    );
    let (code, out) = verify(&image, &public);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("not found in the registry"), "{out}");

    let out = push_signed(&file, &image, &key, "s3cret");
    assert!(out.status.success(), "{}", stderr(&out));
    let said = stdout(&out);
    let digest = said
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .unwrap()
        .to_string();
    assert!(
        said.contains(&format!("signed {digest} under {}", sig_tag(&digest))),
        "{said}"
    );
    assert!(
        cosign_verifies(&public, &image),
        "cosign accepts our signature"
    );
    let (code, out) = verify(&image, &public);
    assert_eq!(code, 0, "{out}");

    // cosign adds its own beside ours; signing again with our key adds nothing, drops nothing.
    cosign_sign(&their_key, &format!("{}/{repo}@{digest}", env.registry));
    assert!(cosign_verifies(&their_public, &image));
    let before = get_manifest_bytes(&env.registry, &repo, &sig_tag(&digest)).await;
    let out = push_signed(&file, &image, &key, "s3cret");
    assert!(out.status.success(), "{}", stderr(&out));
    let after = get_manifest_bytes(&env.registry, &repo, &sig_tag(&digest)).await;
    assert_eq!(before, after, "the same signature is not added twice");
    assert!(cosign_verifies(&public, &image) && cosign_verifies(&their_public, &image));
}

/// `cosign sign --key --new-bundle-format`: a Sigstore bundle (cosign 3's default form) in a
/// manifest that refers to the module's (this registry has no referrers API, so cosign writes
/// the OCI 1.1 fallback tag `sha256-<hex>`).
fn cosign_sign_bundle(key: &Path, image_at_digest: &str) {
    cosign_sign_with(key, image_at_digest, &["--new-bundle-format".as_ref()]);
}

/// Whether `cosign verify --new-bundle-format --key` accepts `image` (with a trusted root that
/// trusts nothing but the key: no log, no CA).
fn cosign_verifies_bundle(public: &Path, image: &str, dir: &Path) -> bool {
    let root = dir.join("trusted_root.json");
    std::fs::write(
        &root,
        r#"{"mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1"}"#,
    )
    .unwrap();
    cosign_verifies_with(
        image,
        &[
            "--key".as_ref(),
            public.as_os_str(),
            "--new-bundle-format".as_ref(),
            "--trusted-root".as_ref(),
            root.as_os_str(),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstore_bundles_verify_as_cosign_verifies_them_in_the_cli_and_the_operator() {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("bundles");
    let n = &ns.name;
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = key_pair(dir.path(), "team");
    let (_, other) = key_pair(dir.path(), "other");
    let repo = format!("sig/bundle-{:08x}", fastrand::u32(..));
    let signed = format!("{}/{repo}:signed", env.registry);
    let first = module("bundle-signed");
    let digest = push_module(&signed, first.clone()).await;
    cosign_sign_bundle(&key, &format!("{}/{repo}@{digest}", env.registry));

    let (code, out) = verify(&signed, &public);
    assert_eq!(code, 0, "{out}");
    assert!(out.ends_with("(sigstore-bundle)\n"), "{out}");
    assert!(cosign_verifies_bundle(&public, &signed, dir.path()));
    let (code, out) = verify(&signed, &other);
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("SignerNotTrusted: "), "{out}");
    assert!(!cosign_verifies_bundle(&other, &signed, dir.path()));

    // The signed module's referrers, placed under an unsigned module's fallback tag: a valid
    // bundle, of another manifest.
    let unsigned = format!("{}/{repo}:unsigned", env.registry);
    let unsigned_digest = push_module(&unsigned, module("bundle-unsigned")).await;
    let fallback = |d: &str| d.replacen(':', "-", 1);
    let index = get_manifest_as(
        &env.registry,
        &repo,
        &fallback(&digest),
        "application/vnd.oci.image.index.v1+json",
    )
    .await;
    put_manifest(
        &env.registry,
        &repo,
        &fallback(&unsigned_digest),
        "application/vnd.oci.image.index.v1+json",
        index,
    )
    .await;
    let (code, out) = verify(&unsigned, &public);
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("SignatureInvalid: "), "{out}");
    assert!(out.contains(&format!("refers to {digest}")), "{out}");
    assert!(!cosign_verifies_bundle(&public, &unsigned, dir.path()));

    // The operator deploys the bundle-signed module, and says how it was signed.
    key_config_map(n, "team-keys", &public);
    let _op = Operator::start(n, &[]).await;
    Filter::new(n, "bundled", &signed)
        .edit(verifying(config_map("team-keys")))
        .apply();
    let wf = wait_module(
        &client,
        n,
        "bundled",
        &wasmfilter::cache::sha256_hex(&first),
    )
    .await;
    let signature = wf.status.unwrap().artifact.unwrap().signature.unwrap();
    assert_eq!(signature.scheme, "sigstore-bundle");
    assert_eq!(
        signature.key,
        format!("ConfigMap {n}/team-keys key cosign.pub")
    );
    Filter::new(n, "misdirected", &unsigned)
        .edit(verifying(config_map("team-keys")))
        .apply();
    wait_status(&client, n, "misdirected", "SignatureInvalid", |wf| {
        reason_is(wf, "SignatureInvalid")
    })
    .await;
}

/// A test certificate authority made with openssl: its certificate and key, and a Sigstore
/// trusted root naming it (valid until `end`, RFC 3339, when given).
struct TestCa {
    cert: PathBuf,
    key: PathBuf,
    name: String,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "openssl {args:?}: {}", stderr(&out));
}

fn test_ca(dir: &Path, name: &str) -> TestCa {
    let key = format!("{name}.key");
    let cert = format!("{name}.pem");
    openssl(
        dir,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &key,
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            &key,
            "-subj",
            &format!("/CN={name}/O=wasmfilter test"),
            "-days",
            "3650",
            "-out",
            &cert,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    TestCa {
        cert: dir.join(cert),
        key: dir.join(key),
        name: name.to_string(),
    }
}

impl TestCa {
    /// A trusted root naming this CA, written beside it.
    fn trusted_root(&self, dir: &Path, end: Option<&str>) -> PathBuf {
        use base64::Engine as _;
        let pem = std::fs::read_to_string(&self.cert).unwrap();
        let (_, der) = pem_rfc7468::decode_vec(pem.as_bytes()).unwrap();
        let mut valid_for = json!({"start": "2020-01-01T00:00:00Z"});
        if let Some(end) = end {
            valid_for["end"] = json!(end);
        }
        let root = json!({
            "mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
            "certificateAuthorities": [{
                "subject": {"organization": "wasmfilter test", "commonName": self.name},
                "uri": format!("https://{}.test", self.name),
                "certChain": {"certificates": [{"rawBytes": base64::engine::general_purpose::STANDARD.encode(der)}]},
                "validFor": valid_for,
            }],
        });
        let path = dir.join(format!("{}-root-{}.json", self.name, end.is_some()));
        std::fs::write(&path, root.to_string()).unwrap();
        path
    }

    /// A code-signing certificate for `public` (a cosign public key) naming `subject`, with
    /// Fulcio's OIDC issuer extensions (v1 raw, v2 UTF8String) set to `issuer`.
    fn issue(&self, dir: &Path, public: &Path, subject: &str, issuer: &str) -> PathBuf {
        let hex: String = issuer.bytes().map(|b| format!("{b:02x}")).collect();
        let ext = dir.join("leaf.cnf");
        std::fs::write(
            &ext,
            format!(
                "[leaf]\nbasicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature\n\
                 extendedKeyUsage = codeSigning\nsubjectAltName = email:{subject}\n\
                 1.3.6.1.4.1.57264.1.1 = DER:{hex}\n1.3.6.1.4.1.57264.1.8 = ASN1:UTF8String:{issuer}\n"
            ),
        )
        .unwrap();
        let key = self.key.to_str().unwrap();
        openssl(
            dir,
            &["req", "-new", "-key", key, "-subj", "/", "-out", "leaf.csr"],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "leaf.csr",
                "-force_pubkey",
                public.to_str().unwrap(),
                "-CA",
                self.cert.to_str().unwrap(),
                "-CAkey",
                key,
                "-CAcreateserial",
                "-days",
                "365",
                "-extfile",
                "leaf.cnf",
                "-extensions",
                "leaf",
                "-out",
                "leaf.pem",
            ],
        );
        dir.join("leaf.pem")
    }
}

/// `cosign sign` with a key and its certificate (and the CA as the chain): a keyless-style
/// signature, in the tag scheme or as a bundle.
fn cosign_sign_certified(
    key: &Path,
    cert: &Path,
    chain: &Path,
    image_at_digest: &str,
    bundle: bool,
) {
    let mut extra = vec![
        "--certificate".as_ref(),
        cert.as_os_str(),
        "--certificate-chain".as_ref(),
        chain.as_os_str(),
    ];
    if bundle {
        extra.push("--new-bundle-format".as_ref());
    }
    cosign_sign_with(key, image_at_digest, &extra);
}

/// Whether `cosign verify --certificate-identity --certificate-oidc-issuer --trusted-root`
/// accepts `image` (no log, no certificate transparency: offline).
fn cosign_verifies_identity(
    image: &str,
    subject: &str,
    issuer: &str,
    root: &Path,
    bundle: bool,
) -> bool {
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "--certificate-identity".as_ref(),
        subject.as_ref(),
        "--certificate-oidc-issuer".as_ref(),
        issuer.as_ref(),
        "--trusted-root".as_ref(),
        root.as_os_str(),
        "--insecure-ignore-sct".as_ref(),
    ];
    if bundle {
        args.push("--new-bundle-format".as_ref());
    }
    cosign_verifies_with(image, &args)
}

fn verify_identity(image: &str, subject: &str, issuer: &str, root: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_wasmfilter"))
        .args([
            "verify",
            image,
            "--plain-http",
            "--certificate-identity",
            subject,
        ])
        .args(["--certificate-oidc-issuer", issuer, "--trusted-root"])
        .arg(root)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        stdout(&out) + &stderr(&out),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_signatures_verify_against_a_trusted_root_as_cosign_says_in_the_cli_and_the_operator()
 {
    let env = env();
    let client = client().await;
    let ns = TestNamespace::new("keyless");
    let n = &ns.name;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (key, public) = key_pair(d, "ephemeral");
    let ca = test_ca(d, "test-ca");
    let stranger = test_ca(d, "stranger-ca");
    let (dev, issuer) = ("dev@example.com", "https://issuer.example");
    let cert = ca.issue(d, &public, dev, issuer);
    let root = ca.trusted_root(d, None);
    let repo = format!("sig/keyless-{:08x}", fastrand::u32(..));

    for (tag, bundle) in [("tag-scheme", false), ("bundle", true)] {
        let image = format!("{}/{repo}:{tag}", env.registry);
        let digest = push_module(&image, module(&format!("keyless-{tag}"))).await;
        cosign_sign_certified(
            &key,
            &cert,
            &ca.cert,
            &format!("{}/{repo}@{digest}", env.registry),
            bundle,
        );
        let (code, out) = verify_identity(&image, dev, issuer, &root);
        assert_eq!(code, 0, "{tag}: {out}");
        assert!(
            out.contains(&format!(
                "signed by {dev} (issuer {issuer}, certificate authority https://test-ca.test)"
            )),
            "{out}"
        );
        assert!(
            cosign_verifies_identity(&image, dev, issuer, &root, bundle),
            "{tag}"
        );
        // Another identity, another issuer, another CA: refused by both.
        for (subject, iss, trusted, says) in [
            (
                "ops@example.com",
                issuer,
                &root,
                "names dev@example.com (issuer https://issuer.example), not a required identity",
            ),
            (
                dev,
                "https://elsewhere.example",
                &root,
                "not a required identity",
            ),
            (
                dev,
                issuer,
                &stranger.trusted_root(d, None),
                "was not issued by a certificate authority of",
            ),
        ] {
            let (code, out) = verify_identity(&image, subject, iss, trusted);
            assert_eq!(code, 1, "{tag}: {out}");
            assert!(
                out.starts_with("SignerNotTrusted: ") && out.contains(says),
                "{tag}: {out}"
            );
            assert!(
                !cosign_verifies_identity(&image, subject, iss, trusted, bundle),
                "{tag}: {subject} {iss}"
            );
        }
    }
    // An authority the trusted root no longer vouches for.
    let expired = ca.trusted_root(d, Some("2021-01-01T00:00:00Z"));
    let (code, out) = verify_identity(
        &format!("{}/{repo}:bundle", env.registry),
        dev,
        issuer,
        &expired,
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("valid now"), "{out}");
    // A signature made with a plain key is no keyless signature.
    let keyed = format!("{}/{repo}:keyed", env.registry);
    let digest = push_module(&keyed, module("keyless-keyed")).await;
    cosign_sign(&key, &format!("{}/{repo}@{digest}", env.registry));
    let (code, out) = verify_identity(&keyed, dev, issuer, &root);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("a signature made with a key, not a certificate"),
        "{out}"
    );

    // The operator: the trusted root from a ConfigMap, the identity from the spec.
    let out = kubectl(&[
        "create",
        "configmap",
        "sigstore-root",
        "-n",
        n,
        &format!("--from-file=trusted_root.json={}", root.display()),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let _op = Operator::start(n, &[]).await;
    let keyless = |subject: &str| {
        let subject = subject.to_string();
        move |spec: &mut wasmfilter::api::WasmFilterSpec| {
            spec.module.verify = Some(Verification {
                cosign: CosignVerification {
                    public_keys: None,
                    keyless: Some(wasmfilter::api::KeylessVerification {
                        trusted_root: "sigstore-root".into(),
                        identities: vec![wasmfilter::api::CertificateIdentity {
                            issuer: "https://issuer.example".into(),
                            subject,
                        }],
                    }),
                },
            })
        }
    };
    let bundled = format!("{}/{repo}:bundle", env.registry);
    Filter::new(n, "keyless", &bundled)
        .edit(keyless(dev))
        .apply();
    let wf = wait_condition(&client, n, "keyless", "Ready", "True").await;
    let signature = wf.status.unwrap().artifact.unwrap().signature.unwrap();
    assert_eq!(signature.scheme, "sigstore-bundle");
    assert_eq!(
        signature.key,
        format!("{dev} (issuer {issuer}, certificate authority https://test-ca.test)")
    );
    assert!(signature.key_fingerprint.starts_with("sha256:"));
    Filter::new(n, "stranger", &bundled)
        .edit(keyless("ops@example.com"))
        .apply();
    let wf = wait_status(&client, n, "stranger", "SignerNotTrusted", |wf| {
        reason_is(wf, "SignerNotTrusted")
    })
    .await;
    let message = &condition(&wf, "Ready").unwrap().message;
    assert!(message.contains("not a required identity"), "{message}");
}
