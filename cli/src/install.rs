//! `conduit install`: the Kubernetes manifests of the Helm chart `charts/conduit`, rendered
//! without Helm, with a freshly generated certificate authority and webhook certificate.
//!
//! The chart is the one source of truth: its templates and values are compiled into this
//! binary and rendered by [`render`], which implements the small part of Helm's template
//! language the chart uses (see `charts/conduit/values.yaml`); anything else in a template is
//! an error naming the template, never output silently wrong. The tests render the chart with
//! both this and `helm template` and compare the objects.
//!
//! What `conduit install` adds to the chart's output: the namespace (Helm's
//! `--create-namespace`), and the values the chart requires and cannot make itself: the
//! identity trust anchor and issuer (bootstrapped as the controller would) and the webhook's
//! serving certificate for `conduit-webhook.NAMESPACE.svc`, signed by that issuer.

use std::collections::BTreeMap;

use anyhow::{Context as _, anyhow, bail};
use base64::Engine as _;
use serde_yaml_ng::{Mapping, Value};

/// The chart's files, as compiled in: `(path in the chart, contents)`.
pub const CHART_FILES: &[(&str, &str)] = &[
    (
        "Chart.yaml",
        include_str!("../../charts/conduit/Chart.yaml"),
    ),
    (
        "values.yaml",
        include_str!("../../charts/conduit/values.yaml"),
    ),
    (
        "values-ha.yaml",
        include_str!("../../charts/conduit/values-ha.yaml"),
    ),
    (
        "crds/conduit.io.yaml",
        include_str!("../../charts/conduit/crds/conduit.io.yaml"),
    ),
    (
        "templates/identity.yaml",
        include_str!("../../charts/conduit/templates/identity.yaml"),
    ),
    (
        "templates/controller.yaml",
        include_str!("../../charts/conduit/templates/controller.yaml"),
    ),
    (
        "templates/webhook.yaml",
        include_str!("../../charts/conduit/templates/webhook.yaml"),
    ),
];

fn chart_file(path: &str) -> &'static str {
    CHART_FILES
        .iter()
        .find(|(p, _)| *p == path)
        .map_or("", |(_, text)| text)
}

/// What `conduit install` is asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstallOptions {
    /// The control plane's namespace.
    pub namespace: String,
    /// Three controller replicas spread over nodes, a PodDisruptionBudget (`values-ha.yaml`).
    pub ha: bool,
    /// The webhook's `failurePolicy`: `Fail` or `Ignore`.
    pub webhook_failure_policy: String,
    /// The cluster's DNS domain.
    pub cluster_domain: String,
    /// The PodDisruptionBudget's API version (`policy/v1`; `policy/v1beta1` on Kubernetes 1.20).
    pub pdb_api_version: String,
}

impl Default for InstallOptions {
    fn default() -> Self {
        Self {
            namespace: "conduit".into(),
            ha: false,
            webhook_failure_policy: "Fail".into(),
            cluster_domain: "cluster.local".into(),
            pdb_api_version: "policy/v1".into(),
        }
    }
}

/// The chart's values for `options`, with `pki`'s certificates: `values.yaml`, then
/// `values-ha.yaml` when asked for, then the options.
///
/// # Errors
///
/// The compiled-in values do not parse (a broken build), or an option is invalid.
pub fn values(options: &InstallOptions, pki: &Pki) -> anyhow::Result<Value> {
    if !matches!(options.webhook_failure_policy.as_str(), "Fail" | "Ignore") {
        bail!(
            "the webhook failure policy is `Fail` or `Ignore`, not `{}`",
            options.webhook_failure_policy
        );
    }
    let mut values: Value =
        serde_yaml_ng::from_str(chart_file("values.yaml")).context("the chart's values.yaml")?;
    if options.ha {
        let ha: Value = serde_yaml_ng::from_str(chart_file("values-ha.yaml"))
            .context("the chart's values-ha.yaml")?;
        merge(&mut values, ha);
    }
    let set: Value = serde_yaml_ng::to_value(serde_json::json!({
        "clusterDomain": options.cluster_domain,
        "controller": {"podDisruptionBudgetApiVersion": options.pdb_api_version},
        "identity": {
            "trustAnchorsPEM": pki.trust_anchors_pem,
            "issuer": {"crtPEM": pki.issuer_crt_pem, "keyPEM": pki.issuer_key_pem},
        },
        "webhook": {
            "failurePolicy": options.webhook_failure_policy,
            "crtPEM": pki.webhook_crt_pem,
            "keyPEM": pki.webhook_key_pem,
            "caBundlePEM": pki.trust_anchors_pem,
        },
    }))?;
    merge(&mut values, set);
    Ok(values)
}

/// Merges `over` into `base`: maps key by key, anything else replaced (Helm's rule).
pub fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Mapping(base), Value::Mapping(over)) => {
            for (key, value) in over {
                match base.get_mut(&key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, over) => *base = over,
    }
}

/// The certificates `conduit install` generates.
#[derive(Clone, Debug)]
pub struct Pki {
    /// The trust anchor (PEM), which proxies trust and the API server verifies the webhook with.
    pub trust_anchors_pem: String,
    /// The identity issuer's certificate (PEM), signed by the trust anchor.
    pub issuer_crt_pem: String,
    /// The issuer's PKCS#8 key (PEM).
    pub issuer_key_pem: String,
    /// The webhook's serving chain (PEM: its certificate, then the issuer's).
    pub webhook_crt_pem: String,
    /// The webhook's key (PEM).
    pub webhook_key_pem: String,
}

/// Bootstraps a certificate authority as the controller does on first start (in a temporary
/// directory, removed after) and signs the webhook's certificate with its issuer, valid as long
/// as the issuer.
///
/// # Errors
///
/// A key or certificate cannot be generated or the temporary directory cannot be written.
pub fn generate_pki(namespace: &str, cluster_domain: &str) -> anyhow::Result<Pki> {
    use conduit_controller::identity::{
        ISSUER_CERT_FILE, ISSUER_KEY_FILE, IdentityConfig, TRUST_ANCHORS_FILE, ca,
        system_wall_clock,
    };
    // One directory per call: callers may run at once (tests do).
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("conduit-install-{}-{call}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let result = (|| {
        let authority =
            ca::CertificateAuthority::open(&IdentityConfig::new(dir.clone()), system_wall_clock())
                .context("bootstrapping the certificate authority")?;
        let read = |file: &str| {
            std::fs::read_to_string(dir.join(file)).with_context(|| format!("reading {file}"))
        };
        let trust_anchors_pem = read(TRUST_ANCHORS_FILE)?;
        let issuer_crt_pem = read(ISSUER_CERT_FILE)?;
        let issuer_key_pem = read(ISSUER_KEY_FILE)?;
        // The same certificate the controller issues when the values give none, but lasting
        // as long as the issuer: nothing renews it.
        let names = conduit_controller::identity::webhook::WebhookCertificate {
            secret: String::new(),
            configuration: String::new(),
            service: "conduit-webhook".into(),
        }
        .names(namespace, cluster_domain);
        let webhook = authority
            .certify_server(&names, conduit_controller::identity::CA_VALIDITY)
            .context("the webhook's certificate")?;
        Ok(Pki {
            trust_anchors_pem,
            webhook_crt_pem: webhook.chain_pem,
            issuer_crt_pem,
            issuer_key_pem,
            webhook_key_pem: webhook.key_pem,
        })
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The whole install: the namespace, the CRDs, and the chart's templates rendered with
/// [`values`].
///
/// # Errors
///
/// As [`values`] and [`render`].
pub fn install(options: &InstallOptions, pki: &Pki) -> anyhow::Result<String> {
    let values = values(options, pki)?;
    let mut out = format!(
        "# Conduit {}: `conduit install` (the Helm chart charts/conduit, rendered).\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {}\n  labels:\n    \
         app.kubernetes.io/part-of: conduit\n",
        env!("CARGO_PKG_VERSION"),
        options.namespace
    );
    out.push_str("---\n# Source: conduit/crds/conduit.io.yaml\n");
    out.push_str(chart_file("crds/conduit.io.yaml").trim_start_matches("---\n"));
    out.push_str(&render(&values, &options.namespace)?);
    Ok(out)
}

/// Renders the chart's templates (not its CRDs) with `values` into release `namespace`, as
/// `helm template` would: each document under a `# Source:` comment.
///
/// # Errors
///
/// A template uses something this renderer does not implement, or a required value is
/// missing; the error names the template.
pub fn render(values: &Value, namespace: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    for (path, text) in CHART_FILES {
        if !path.starts_with("templates/") {
            continue;
        }
        let rendered = render_template(text, values, namespace)
            .with_context(|| format!("charts/conduit/{path}"))?;
        for document in rendered.split("\n---\n") {
            if document
                .lines()
                .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
            {
                continue;
            }
            out.push_str(&format!("---\n# Source: conduit/{path}\n"));
            out.push_str(document.trim_end());
            out.push('\n');
        }
    }
    Ok(out)
}

// === The template subset ===

#[derive(Debug)]
enum Node {
    Text(String),
    Output(String),
    If(String, Vec<Self>, Vec<Self>),
}

/// Renders one template.
fn render_template(text: &str, values: &Value, namespace: &str) -> anyhow::Result<String> {
    let tokens = tokenize(text)?;
    let mut tokens = tokens.into_iter();
    let (nodes, end) = parse(&mut tokens)?;
    if let Some(end) = end {
        bail!("`{{{{ {end} }}}}` without an `if`");
    }
    let mut out = String::new();
    emit(&nodes, values, namespace, &mut out)?;
    Ok(out)
}

enum Token {
    Text(String),
    Action(String),
}

/// Splits a template into text and actions, applying `{{-` and `-}}` whitespace trimming.
fn tokenize(text: &str) -> anyhow::Result<Vec<Token>> {
    let mut tokens = Vec::new();
    let mut rest = text;
    let mut trim_next = false;
    loop {
        let (literal, after) = match rest.find("{{") {
            Some(at) => (&rest[..at], Some(&rest[at + 2..])),
            None => (rest, None),
        };
        let mut literal = if trim_next {
            literal.trim_start()
        } else {
            literal
        };
        let Some(after) = after else {
            tokens.push(Token::Text(literal.to_owned()));
            return Ok(tokens);
        };
        let (trim_before, after) = match after.strip_prefix('-') {
            Some(after) => (true, after),
            None => (false, after),
        };
        if trim_before {
            literal = literal.trim_end();
        }
        tokens.push(Token::Text(literal.to_owned()));
        let close = after
            .find("}}")
            .ok_or_else(|| anyhow!("an action opened with `{{{{` is never closed"))?;
        let action = &after[..close];
        let (action, trim_after) = match action.strip_suffix('-') {
            Some(action) => (action, true),
            None => (action, false),
        };
        tokens.push(Token::Action(action.trim().to_owned()));
        trim_next = trim_after;
        rest = &after[close + 2..];
    }
}

/// Parses nodes up to an `else` or `end` (returned) or the end of the template.
fn parse(tokens: &mut impl Iterator<Item = Token>) -> anyhow::Result<(Vec<Node>, Option<String>)> {
    let mut nodes = Vec::new();
    while let Some(token) = tokens.next() {
        match token {
            Token::Text(text) => nodes.push(Node::Text(text)),
            Token::Action(action) if action == "else" || action == "end" => {
                return Ok((nodes, Some(action)));
            }
            Token::Action(action) => match action.strip_prefix("if ") {
                Some(condition) => {
                    let (then, end) = parse(tokens)?;
                    let otherwise = match end.as_deref() {
                        Some("end") => Vec::new(),
                        Some("else") => match parse(tokens)? {
                            (otherwise, Some(end)) if end == "end" => otherwise,
                            _ => bail!("`if {condition}` ... `else` has no `end`"),
                        },
                        _ => bail!("`if {condition}` has no `end`"),
                    };
                    nodes.push(Node::If(condition.trim().to_owned(), then, otherwise));
                }
                None => nodes.push(Node::Output(action)),
            },
        }
    }
    Ok((nodes, None))
}

fn emit(nodes: &[Node], values: &Value, namespace: &str, out: &mut String) -> anyhow::Result<()> {
    for node in nodes {
        match node {
            Node::Text(text) => out.push_str(text),
            Node::Output(pipeline) => {
                let value = evaluate(pipeline, values, namespace)?;
                out.push_str(&to_text(&value));
            }
            Node::If(condition, then, otherwise) => {
                let value = evaluate(condition, values, namespace)?;
                let branch = if truthy(&value) { then } else { otherwise };
                emit(branch, values, namespace, out)?;
            }
        }
    }
    Ok(())
}

/// Evaluates `A | f x | g`: the first command's value, then each function with it as its
/// last argument.
fn evaluate(pipeline: &str, values: &Value, namespace: &str) -> anyhow::Result<Value> {
    let mut value: Option<Value> = None;
    for command in split_outside_quotes(pipeline, '|') {
        let words = split_outside_quotes(command.trim(), ' ')
            .into_iter()
            .filter(|w| !w.is_empty())
            .collect::<Vec<_>>();
        let Some((head, args)) = words.split_first() else {
            bail!("an empty command in `{pipeline}`");
        };
        let mut args = args
            .iter()
            .map(|a| operand(a, values, namespace))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if let Some(piped) = value.take() {
            args.push(piped);
        }
        value = Some(match (*head, args.as_slice()) {
            (_, []) if !is_function(head) => operand(head, values, namespace)?,
            ("quote", [v]) => Value::String(format!("{:?}", to_text(v))),
            ("b64enc", [v]) => {
                Value::String(base64::engine::general_purpose::STANDARD.encode(to_text(v)))
            }
            ("indent", [Value::Number(n), v]) => {
                let pad = " ".repeat(usize::try_from(n.as_u64().unwrap_or(0)).unwrap_or(0));
                Value::String(format!(
                    "{pad}{}",
                    to_text(v).replace('\n', &format!("\n{pad}"))
                ))
            }
            ("not", [v]) => Value::Bool(!truthy(v)),
            // As Helm's: the first argument that decides, else the last.
            ("and", [_, _, ..]) => args
                .iter()
                .find(|v| !truthy(v))
                .or(args.last())
                .cloned()
                .unwrap_or(Value::Null),
            ("or", [_, _, ..]) => args
                .iter()
                .find(|v| truthy(v))
                .or(args.last())
                .cloned()
                .unwrap_or(Value::Null),
            ("required", [Value::String(why), v]) => {
                if !truthy(v) {
                    bail!("{why}");
                }
                v.clone()
            }
            _ => bail!(
                "`{command}` in `{pipeline}` is not in the template subset `conduit install` renders (values.yaml lists it)"
            ),
        });
    }
    value.ok_or_else(|| anyhow!("an empty action"))
}

fn is_function(word: &str) -> bool {
    matches!(
        word,
        "quote" | "b64enc" | "indent" | "required" | "not" | "and" | "or"
    )
}

/// A literal (`"text"`, `4`), a reference (`.Values.a.b`, `.Release.Namespace`) or a
/// parenthesized pipeline (`(not .Values.a)`).
fn operand(word: &str, values: &Value, namespace: &str) -> anyhow::Result<Value> {
    if let Some(inner) = word.strip_prefix('(').and_then(|w| w.strip_suffix(')')) {
        return evaluate(inner, values, namespace);
    }
    if let Some(text) = word.strip_prefix('"').and_then(|w| w.strip_suffix('"')) {
        return Ok(Value::String(text.replace("\\\"", "\"")));
    }
    if let Ok(number) = word.parse::<u64>() {
        return Ok(Value::Number(number.into()));
    }
    if word == ".Release.Namespace" {
        return Ok(Value::String(namespace.to_owned()));
    }
    if let Some(path) = word.strip_prefix(".Values.") {
        let mut value = values;
        for key in path.split('.') {
            match value.get(key) {
                Some(inner) => value = inner,
                None => return Ok(Value::Null),
            }
        }
        return Ok(value.clone());
    }
    bail!("`{word}` is not in the template subset `conduit install` renders")
}

fn split_outside_quotes(text: &str, separator: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    let mut escaped = false;
    let mut depth = 0usize;
    for (i, c) in text.char_indices() {
        match c {
            '\\' if quoted => escaped = !escaped,
            '"' if !escaped => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => depth = depth.saturating_sub(1),
            c if c == separator && !quoted && depth == 0 => {
                parts.push(&text[start..i]);
                start = i + c.len_utf8();
            }
            _ => escaped = false,
        }
        if c != '\\' {
            escaped = false;
        }
    }
    parts.push(&text[start..]);
    parts
}

fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|n| n != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Sequence(s) => !s.is_empty(),
        Value::Mapping(m) => !m.is_empty(),
        Value::Tagged(t) => truthy(&t.value),
    }
}

fn to_text(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        other => serde_yaml_ng::to_string(other).unwrap_or_default(),
    }
}

/// The documents of a YAML stream keyed by `kind/namespace/name`, for comparing two renders
/// of the chart by content rather than by text.
///
/// # Errors
///
/// A document is not YAML, or two share a key.
pub fn objects(stream: &str) -> anyhow::Result<BTreeMap<String, Value>> {
    let mut out = BTreeMap::new();
    for document in serde_yaml_ng::Deserializer::from_str(stream) {
        let value =
            <Value as serde::Deserialize>::deserialize(document).context("a YAML document")?;
        if value.is_null() {
            continue;
        }
        let field = |path: &[&str]| {
            path.iter()
                .try_fold(&value, |v, k| v.get(*k))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        let key = format!(
            "{}/{}/{}",
            field(&["kind"]),
            field(&["metadata", "namespace"]),
            field(&["metadata", "name"])
        );
        if out.insert(key.clone(), value).is_some() {
            bail!("two documents are {key}");
        }
    }
    Ok(out)
}

/// An empty mapping (for tests building values by hand).
#[must_use]
pub fn empty_values() -> Value {
    Value::Mapping(Mapping::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placeholder_pki() -> Pki {
        let pem = |what: &str| format!("-----BEGIN {what}-----\nAAAA\n-----END {what}-----\n");
        Pki {
            trust_anchors_pem: pem("CERTIFICATE"),
            issuer_crt_pem: pem("CERTIFICATE"),
            issuer_key_pem: pem("PRIVATE KEY"),
            webhook_crt_pem: pem("CERTIFICATE"),
            webhook_key_pem: pem("PRIVATE KEY"),
        }
    }

    /// The chart's templates as `conduit install` renders them (certificates replaced by
    /// placeholders), with the HA values: a change to a template shows up here.
    #[test]
    fn the_rendered_templates() {
        let options = InstallOptions {
            ha: true,
            ..InstallOptions::default()
        };
        let values = values(&options, &placeholder_pki()).expect("values");
        insta::assert_snapshot!(render(&values, "conduit").expect("renders"));
    }

    #[test]
    fn the_subset_trims_and_branches_as_helm_does() {
        let values: Value =
            serde_yaml_ng::from_str("on: true\noff: false\nname: web\nlines: \"a\\nb\"\n")
                .expect("yaml");
        let render = |text: &str| render_template(text, &values, "ns").expect("renders");
        assert_eq!(
            render("x:\n  {{- if .Values.on }}\n  y: 1\n  {{- end }}\n"),
            "x:\n  y: 1\n"
        );
        assert_eq!(
            render("x:\n  {{- if .Values.off }}\n  y: 1\n  {{- end }}\n"),
            "x:\n"
        );
        assert_eq!(render("{{ if .Values.off }}a{{ else }}b{{ end }}"), "b");
        assert_eq!(render("{{ .Values.name | quote }}"), "\"web\"");
        assert_eq!(render("{{ .Values.name | b64enc }}"), "d2Vi");
        assert_eq!(render("{{ .Values.lines | indent 2 }}"), "  a\n  b");
        assert_eq!(
            render("{{ .Release.Namespace }}-{{ .Values.missing }}"),
            "ns-"
        );
        // Boolean functions, as Helm's: `and` / `or` give the deciding argument.
        assert_eq!(render("{{ not .Values.off }}"), "true");
        assert_eq!(render("{{ not .Values.name }}"), "false");
        assert_eq!(render("{{ and .Values.on .Values.name }}"), "web");
        assert_eq!(render("{{ and .Values.off .Values.name }}"), "false");
        assert_eq!(render("{{ or .Values.missing .Values.name }}"), "web");
        assert_eq!(
            render("{{ if or (not .Values.on) (not .Values.name) }}a{{ else }}b{{ end }}"),
            "b"
        );
        assert_eq!(
            render("{{ if or (not .Values.on) (not .Values.off) }}a{{ else }}b{{ end }}"),
            "a"
        );
        assert_eq!(render("{{ (.Values.name | quote) }}"), "\"web\"");
        for unsupported in [
            "{{ .Values.name | upper }}",
            "{{ include \"x\" . }}",
            "{{ if .Values.on }}no end",
            "{{ end }}",
            "{{ .Values.name",
        ] {
            assert!(
                render_template(unsupported, &values, "ns").is_err(),
                "{unsupported}"
            );
        }
    }
}
