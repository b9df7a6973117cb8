//! Image references, parsed by hand to the grammar of [`crate::api::IMAGE_REFERENCE_RE`] (the
//! CRD's CEL rule). `oci-spec`'s parser compiles a large regex on first use, which costs a
//! short-lived CLI run ~50 ms; this one costs nothing and agrees with the CRD by test.

use oci_client::Reference;

fn is_lower_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// `[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*`
fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_lower_alnum(b[0]) || !is_lower_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_lower_alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !is_lower_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|s| s == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `label(.label)*(:port)?` with labels `[a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?`
fn valid_registry(r: &str) -> bool {
    let (host, port) = match r.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (r, None),
    };
    // 1 to 65535, no sign, no leading zero.
    if port.is_some_and(|p| p.starts_with(['0', '+']) || p.parse::<u16>().is_err()) {
        return false;
    }
    !host.is_empty()
        && host.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        })
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`
fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    })
}

/// Parses `[oci://][registry/]repository[:tag][@sha256:hex]`, with Docker's defaults
/// (`docker.io`, `library/`, `latest`). `None` when it does not fit the grammar.
pub fn parse(image: &str) -> Option<Reference> {
    let s = image.strip_prefix("oci://").unwrap_or(image);
    let (rest, digest) = match s.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (s, None),
    };
    if digest.is_some_and(|d| !valid_digest(d)) {
        return None;
    }
    // A tag is after the last ':' that follows the last '/'.
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if tag.is_some_and(|t| !valid_tag(t)) {
        return None;
    }
    let (registry, repository) = match name.split_once('/') {
        Some((first, path))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            if !valid_registry(first) {
                return None;
            }
            (first.to_string(), path.to_string())
        }
        _ => ("docker.io".to_string(), name.to_string()),
    };
    if repository.is_empty() || !repository.split('/').all(valid_path_component) {
        return None;
    }
    let repository = if registry == "docker.io" && !repository.contains('/') {
        format!("library/{repository}")
    } else {
        repository
    };
    Some(match (tag, digest) {
        (Some(t), Some(d)) => {
            Reference::with_tag_and_digest(registry, repository, t.to_string(), d.to_string())
        }
        (None, Some(d)) => Reference::with_digest(registry, repository, d.to_string()),
        (t, None) => Reference::with_tag(registry, repository, t.unwrap_or("latest").to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the grammar accepts and refuses (the CRD's CEL rule and this parser alike).
    const ACCEPTED: &[&str] = &[
        "registry.example.com/filters/add-header:1.2.0",
        "127.0.0.1:5000/f/a@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "127.0.0.1:5000/f/a:v1@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "oci://ghcr.io/org/filter:v1",
        "busybox",
        "localhost:5000/a__b/c-d:tag",
        "localhost/a",
        "a/b/c",
        "r.io/a--b",
        "r.io:65535/a",
        "r.io:1/a",
        "registry:5000/a",
        "localhost:5000/a/b",
        "a.b.c/d",
        "a.b",
        "a_b/c.d",
        "a__b-c/d_e/f",
    ];
    const REFUSED: &[&str] = &[
        "",
        "Registry/UPPER:1",
        "http://example.com/a:1",
        "a:b:c",
        "a@sha256:123",
        "a b",
        "r.io/a..b",
        "r.io/a___b",
        "r.io/-a",
        "r.io/a:",
        "r.io:/a",
        "r.io:5000x/a",
        "r.io:99999/a",
        "r.io:65536/a",
        "r.io:0/a",
        "r.io:05000/a",
        "r.io:+500/a",
        // Found by fuzzing: no dot, port or localhost, so `zuI0` is a path component (Docker
        // reads docker.io/zuI0/3), and upper case is not allowed there.
        "zuI0/3",
        // Also found by fuzzing: a first component with a dot is a registry, so `_` is not
        // allowed in it, though it is in a path.
        "u1u4.z.u4_5/z.uu",
        "-r.io/a",
        "r.io/a:-tag",
        "r.io/a/",
        "r.io//a",
        "oci://",
        "r.io/a@sha256:0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef",
    ];

    /// The CRD's CEL rule and this parser accept exactly the references registries accept.
    #[test]
    fn parser_and_crd_rule_accept_the_same_grammar() {
        let re = regex::Regex::new(crate::api::IMAGE_REFERENCE_RE).unwrap();
        for case in ACCEPTED {
            assert!(re.is_match(case), "CRD rule should accept {case:?}");
            assert!(parse(case).is_some(), "parser should accept {case:?}");
        }
        for case in REFUSED {
            assert!(!re.is_match(case), "CRD rule should refuse {case:?}");
            assert!(parse(case).is_none(), "parser should refuse {case:?}");
        }
    }

    #[test]
    fn applies_docker_defaults() {
        let r = parse("busybox").unwrap();
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.repository(), "library/busybox");
        assert_eq!(r.tag(), Some("latest"));
        let r = parse("127.0.0.1:5000/f/a:v1").unwrap();
        assert_eq!(
            (r.registry(), r.repository(), r.tag()),
            ("127.0.0.1:5000", "f/a", Some("v1"))
        );
        let r =
            parse("r.io/a@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
                .unwrap();
        assert_eq!(r.tag(), None);
        assert!(r.digest().is_some());
    }
}
