//! The Kubernetes manifests in `deploy/k8s`, checked as a cluster would see them: every overlay
//! is rendered with `kubectl kustomize`, validated against the Kubernetes schemas
//! (kubernetes-validate, strict), and then held to what the deployment promises: non-root pods
//! on a read-only root filesystem with requests and limits, gRPC probes on each service's port
//! (or, where that port speaks TLS, on its plaintext health port), mutual TLS in production,
//! secrets only by reference, the configuration each service requires, who may reach whom, and
//! a gateway whose Envoy configuration Envoy itself accepts.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use keyshare_runtime::testkit::{tool, workspace_root};
use serde_json::Value;

/// Keyshare's services: name, gRPC port, metrics port (README "Operations").
const SERVICES: &[(&str, u64, u64)] =
    &[("identity", 50051, 9051), ("keyring", 50052, 9052), ("invitation", 50053, 9053), ("authorizer", 50054, 9054)];

/// The authorizer's management port (UsageService), besides its check port in [`SERVICES`].
const AUTHORIZER_MANAGEMENT: u64 = 50055;

/// Variables whose values are secret: given only through a Secret, never in a manifest.
const SECRET_VARS: &[&str] = &[
    "DATABASE_URL",
    "KEYSHARE_KEY_ENCRYPTION_KEYS",
    "KEYSHARE_INTERNAL_CLIENTS",
    "KEYSHARE_CLIENT_SECRET",
    "KEYSHARE_SMTP_URL",
];

/// Custom resources, which kubernetes-validate has no schema for; checked field by field here.
const CUSTOM_KINDS: &[(&str, &str)] =
    &[("postgresql.cnpg.io/v1", "Cluster"), ("cert-manager.io/v1", "Certificate"), ("cert-manager.io/v1", "Issuer")];

/// Where production pods mount their certificate's Secret, and the plaintext health port the
/// kubelet's gRPC probes use when the gRPC port speaks TLS.
const TLS_DIR: &str = "/etc/keyshare/tls";
const HEALTH_PORT: u64 = 8081;

/// The label the authorizer's NetworkPolicy admits gateways by.
const GATEWAY_LABEL: &str = "keyshare.dev/gateway";

#[test]
fn every_overlay_renders_validates_and_is_locked_down() {
    let overlays = overlays();
    assert!(overlays.contains(&"dev".to_owned()) && overlays.contains(&"production".to_owned()), "{overlays:?}");
    for overlay in overlays {
        let rendered = Rendered::overlay(&overlay);
        rendered.validate();
        check_no_secret_values(&rendered);
        check_pods_are_locked_down(&rendered);
        check_services(&rendered);
        check_network_policies(&rendered);
        check_gateway(&rendered);
    }
}

/// Production encrypts every gRPC connection with mutual TLS: each service and the gateway
/// mount the Secret of a cert-manager Certificate of the namespace's CA that names them first
/// (the internal client their tokens name), serve and call over TLS, and require client
/// certificates of that CA.
#[test]
fn production_uses_mutual_tls_everywhere() {
    let rendered = Rendered::overlay("production");
    let config = &rendered.config_map("keyshare-config")["data"];
    for (var, file) in [
        ("KEYSHARE_TLS_CERT", "tls.crt"),
        ("KEYSHARE_TLS_KEY", "tls.key"),
        ("KEYSHARE_TLS_CA", "ca.crt"),
        ("KEYSHARE_TLS_CLIENT_CA", "ca.crt"),
    ] {
        assert_eq!(config[var].as_str(), Some(format!("{TLS_DIR}/{file}").as_str()), "{var}");
    }
    let ca_issuer = rendered.get("Issuer", "keyshare-ca");
    let ca = rendered.get("Certificate", "keyshare-ca");
    assert_eq!(ca["spec"]["isCA"], true);
    assert_eq!(ca_issuer["spec"]["ca"]["secretName"], ca["spec"]["secretName"]);
    let namespace = rendered.namespace();
    let workloads = SERVICES.iter().map(|(service, _, _)| *service).chain(["gateway"]);
    for workload in workloads {
        let deployment = rendered.get("Deployment", workload);
        let pod = pod_spec(deployment);
        let container = containers(deployment).next().unwrap();
        let mount = container["volumeMounts"].as_array().unwrap().iter().find(|m| m["mountPath"] == TLS_DIR);
        let mount = mount.unwrap_or_else(|| panic!("{workload} mounts no certificate at {TLS_DIR}"));
        let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap();
        let secret = volume["secret"]["secretName"].as_str().unwrap();
        let certificate = rendered
            .all("Certificate")
            .find(|c| c["spec"]["secretName"] == secret)
            .unwrap_or_else(|| panic!("{workload}: no Certificate makes Secret {secret}"));
        assert_eq!(certificate["spec"]["issuerRef"]["name"], "keyshare-ca", "{workload}");
        let names: Vec<&str> =
            certificate["spec"]["dnsNames"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
        assert_eq!(names.first().copied(), Some(workload), "{workload}: {names:?}");
        assert!(names.contains(&format!("{workload}.{namespace}.svc").as_str()), "{workload}: {names:?}");
        let usages = &certificate["spec"]["usages"];
        for usage in ["server auth", "client auth"] {
            assert!(usages.as_array().unwrap().contains(&Value::from(usage)), "{workload}: {usages}");
        }
        // Renewed before it expires; the services re-read renewed files.
        assert!(certificate["spec"]["renewBefore"].is_string(), "{workload}");
        // Envoy and the services run as uid/gid 65532: the key is readable by the pod's group.
        assert_eq!(pod["securityContext"]["fsGroup"], 65532, "{workload}");
    }
    for (service, _, _) in SERVICES {
        for port in rendered.get("Service", service)["spec"]["ports"].as_array().unwrap() {
            assert_ne!(port["appProtocol"], "kubernetes.io/h2c", "{service}: its TLS port {port} is marked cleartext");
        }
    }
    let gateway_config = rendered.config_map("gateway-envoy")["data"]["envoy.yaml"].as_str().unwrap();
    let envoy = yaml_to_json(gateway_config.as_bytes());
    let cluster = envoy[0]["static_resources"]["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|cluster| cluster["name"] == "keyshare_authorizer")
        .unwrap();
    let tls = &cluster["transport_socket"]["typed_config"];
    assert_eq!(tls["sni"], "authorizer");
    let context = &tls["common_tls_context"];
    assert_eq!(context["tls_certificates"][0]["certificate_chain"]["filename"], format!("{TLS_DIR}/tls.crt"));
    assert_eq!(context["validation_context"]["trusted_ca"]["filename"], format!("{TLS_DIR}/ca.crt"));
}

#[test]
fn production_is_highly_available() {
    let rendered = Rendered::overlay("production");
    let authorizer = rendered.get("Deployment", "authorizer");
    let labels = pod_labels(authorizer);

    let hpa = rendered.get("HorizontalPodAutoscaler", "authorizer");
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Deployment");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "authorizer");
    let min = hpa["spec"]["minReplicas"].as_u64().unwrap();
    assert!(min >= 2 && hpa["spec"]["maxReplicas"].as_u64().unwrap() > min, "{hpa}");
    assert!(!hpa["spec"]["metrics"].as_array().unwrap().is_empty());
    // With an autoscaler, a replica count in the Deployment would reset the scale on every apply.
    assert!(authorizer["spec"].get("replicas").is_none(), "the HPA owns the authorizer's replicas");

    for (service, _, _) in SERVICES {
        let deployment = rendered.get("Deployment", service);
        if *service != "authorizer" {
            assert!(deployment["spec"]["replicas"].as_u64().unwrap() >= 2, "{service} runs one replica");
        }
        let budgets: Vec<&Value> = rendered
            .all("PodDisruptionBudget")
            .filter(|pdb| selector_matches(&pdb["spec"]["selector"], &pod_labels(deployment)))
            .collect();
        assert_eq!(budgets.len(), 1, "{service} needs one PodDisruptionBudget");
        assert_eq!(budgets[0]["apiVersion"], "policy/v1");
    }

    let anti_affinity = &authorizer["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"];
    let terms: Vec<&Value> =
        ["requiredDuringSchedulingIgnoredDuringExecution", "preferredDuringSchedulingIgnoredDuringExecution"]
            .iter()
            .flat_map(|kind| anti_affinity[kind].as_array().into_iter().flatten())
            .map(|term| if term.get("podAffinityTerm").is_some() { &term["podAffinityTerm"] } else { term })
            .collect();
    assert!(
        terms
            .iter()
            .any(|term| term["topologyKey"] == "kubernetes.io/hostname"
                && selector_matches(&term["labelSelector"], &labels)),
        "the authorizer's replicas are not spread across nodes: {anti_affinity}"
    );

    // A highly available PostgreSQL from the CloudNativePG operator, and every service using it.
    let cluster = rendered.get("Cluster", "keyshare-pg");
    assert_eq!(cluster["apiVersion"], "postgresql.cnpg.io/v1");
    let spec = &cluster["spec"];
    assert_eq!(spec["instances"], 3);
    assert!(spec["storage"]["size"].is_string() || spec["storage"]["pvcTemplate"].is_object(), "{spec}");
    let initdb = &spec["bootstrap"]["initdb"];
    assert!(initdb["database"].is_string() && initdb["owner"].is_string(), "{initdb}");
    if let Some(image) = spec["imageName"].as_str() {
        assert!(image.rsplit_once(':').is_some_and(|(_, tag)| !tag.is_empty()), "untagged image {image}");
    }
    assert_eq!(spec["affinity"]["enablePodAntiAffinity"], true);
    let app_secret = format!("{}-app", cluster["metadata"]["name"].as_str().unwrap());
    for (service, _, _) in SERVICES {
        let database_url = env_var(rendered.get("Deployment", service), "DATABASE_URL").unwrap();
        assert_eq!(database_url["valueFrom"]["secretKeyRef"]["name"], app_secret.as_str(), "{service}");
        assert_eq!(database_url["valueFrom"]["secretKeyRef"]["key"], "uri", "{service}");
    }

    // Mail must leave over SMTP: no silent spooling in production.
    for service in ["identity", "invitation"] {
        let smtp = env_var(rendered.get("Deployment", service), "KEYSHARE_SMTP_URL").unwrap();
        assert_eq!(smtp["valueFrom"]["secretKeyRef"]["optional"], false, "{service}");
    }
}

#[test]
fn production_authorizers_share_limits_through_a_redis_only_they_reach() {
    let rendered = Rendered::overlay("production");
    let namespace = rendered.namespace();
    let config = rendered.config_map("keyshare-config");
    let url = config["data"]["KEYSHARE_REDIS_URL"].as_str().expect("production sets KEYSHARE_REDIS_URL");
    let (host, port) = url.strip_prefix("redis://").and_then(|rest| rest.split_once(':')).unwrap();
    let port: u64 = port.trim_end_matches('/').parse().unwrap();
    let service = rendered.get("Service", host);
    assert!(service["spec"]["ports"].as_array().unwrap().iter().any(|p| p["port"] == port), "{service}");
    let redis = rendered
        .all("Deployment")
        .find(|d| selector_matches(&serde_json::json!({"matchLabels": service["spec"]["selector"]}), &pod_labels(d)))
        .expect("a Deployment behind the Redis Service");
    let container = containers(redis).next().unwrap();
    assert!(container_port(container, "redis") == Some(port), "{container}");
    // The authorizer reads it from the ConfigMap it loads.
    let authorizer = rendered.get("Deployment", "authorizer");
    let loads = containers(authorizer).next().unwrap()["envFrom"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|source| source["configMapRef"]["name"] == config["metadata"]["name"]);
    assert!(loads && env_var(authorizer, "KEYSHARE_REDIS_URL").is_none(), "the authorizer does not get {url}");

    // Only the authorizer reaches it; it reaches nothing.
    let policies: Vec<&Value> = rendered.all("NetworkPolicy").collect();
    let pod = |labels: BTreeMap<String, String>| Endpoint::Pod { namespace: namespace.clone(), labels };
    let to = pod(pod_labels(redis));
    for (source, _, _) in SERVICES {
        let from = pod(pod_labels(rendered.get("Deployment", source)));
        assert_eq!(allowed(&policies, &from, &to, port, "TCP"), *source == "authorizer", "{source} -> redis:{port}");
    }
    let gateway = pod(pod_labels(rendered.get("Deployment", "gateway")));
    let client = pod(BTreeMap::from([("keyshare.dev/client".to_owned(), "true".to_owned())]));
    let ingress = Endpoint::Pod { namespace: "ingress-nginx".into(), labels: BTreeMap::new() };
    for (source, from) in
        [("gateway", &gateway), ("client", &client), ("ingress", &ingress), ("outside", &Endpoint::Outside)]
    {
        assert!(!allowed(&policies, from, &to, port, "TCP"), "{source} -> redis:{port}");
    }
    for (port, protocol) in [(443, "TCP"), (5432, "TCP"), (53, "UDP")] {
        assert!(!allowed(&policies, &to, &Endpoint::Outside, port, protocol), "redis -> outside:{port}");
    }
    // The authorizer reaches Redis and still nothing it could not before.
    let authorizer = pod(pod_labels(authorizer));
    assert!(!allowed(&policies, &authorizer, &Endpoint::Outside, port, "TCP"), "authorizer -> outside:{port}");
    assert!(!allowed(&policies, &authorizer, &Endpoint::Outside, 443, "TCP"), "authorizer -> outside:443");
}

#[test]
fn the_readme_creates_every_secret_the_dev_overlay_needs() {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let start = readme.find("\n## Operations").expect("README has no Operations section");
    let section = &readme[start + 1..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    let documented = documented_secrets(section);

    let rendered = Rendered::overlay("dev");
    for deployment in rendered.all("Deployment") {
        for container in containers(deployment) {
            for var in container["env"].as_array().into_iter().flatten() {
                let Some(secret) = var["valueFrom"].get("secretKeyRef") else { continue };
                let (name, key) = (secret["name"].as_str().unwrap(), secret["key"].as_str().unwrap());
                assert!(
                    documented.get(name).is_some_and(|keys| keys.contains(key)),
                    "README \"Operations\" does not show how to create Secret {name} with key {key}; it has {documented:?}"
                );
            }
        }
    }
}

/// Every directory under `deploy/k8s/overlays`.
fn overlays() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(workspace_root().join("deploy/k8s/overlays"))
        .unwrap()
        .map(|entry| entry.unwrap())
        .filter(|entry| entry.file_type().unwrap().is_dir())
        .map(|entry| entry.file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// One overlay, rendered.
struct Rendered {
    overlay: String,
    yaml: Vec<u8>,
    objects: Vec<Value>,
}

impl Rendered {
    fn overlay(overlay: &str) -> Self {
        let dir = workspace_root().join("deploy/k8s/overlays").join(overlay);
        let yaml = run(Command::new(kubectl()).arg("kustomize").arg(&dir), None).stdout;
        let objects = match yaml_to_json(&yaml) {
            Value::Array(objects) => objects,
            other => panic!("{overlay} rendered to {other}"),
        };
        assert!(!objects.is_empty(), "{overlay} rendered nothing");
        Self { overlay: overlay.to_owned(), yaml, objects }
    }

    /// Strict schema validation of everything but the custom resources, whose skipping is the
    /// only warning allowed.
    fn validate(&self) {
        let out = run(Command::new(tool("kubernetes-validate")).args(["--strict", "--quiet", "-"]), Some(&self.yaml));
        let report = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        for line in report.lines().filter(|line| !line.trim().is_empty()) {
            let skipped = CUSTOM_KINDS.iter().any(|(api_version, kind)| {
                line.starts_with("WARN")
                    && line.contains(&format!("Couldn't find schema for kind {kind} with api version {api_version}"))
            });
            assert!(skipped, "{}: kubernetes-validate: {line}", self.overlay);
        }
    }

    fn all<'a>(&'a self, kind: &str) -> impl Iterator<Item = &'a Value> + use<'a> {
        let kind = kind.to_owned();
        self.objects.iter().filter(move |object| object["kind"] == kind.as_str())
    }

    fn find(&self, kind: &str, name: &str) -> Option<&Value> {
        self.all(kind).find(|object| object["metadata"]["name"] == name)
    }

    fn get(&self, kind: &str, name: &str) -> &Value {
        self.find(kind, name).unwrap_or_else(|| panic!("{}: no {kind} {name}", self.overlay))
    }

    /// The namespace the overlay deploys into.
    fn namespace(&self) -> String {
        let namespaces: BTreeSet<&str> =
            self.objects.iter().filter_map(|object| object["metadata"]["namespace"].as_str()).collect();
        assert_eq!(namespaces.len(), 1, "{}: objects in {namespaces:?}", self.overlay);
        namespaces.into_iter().next().unwrap().to_owned()
    }

    /// A ConfigMap by its name in the manifests or, for a generated one, in the rendered output
    /// (with a hash of its contents appended).
    fn config_map(&self, name: &str) -> &Value {
        self.all("ConfigMap")
            .find(|config_map| {
                let rendered = config_map["metadata"]["name"].as_str().unwrap();
                rendered == name
                    || rendered
                        .strip_prefix(name)
                        .and_then(|rest| rest.strip_prefix('-'))
                        .is_some_and(|hash| hash.len() == 10 && !hash.contains('-'))
            })
            .unwrap_or_else(|| panic!("{}: no ConfigMap {name}", self.overlay))
    }
}

/// The renderer `ensure_tools` (scripts/lib.sh) installs, pinned, so renders are reproducible.
fn kubectl() -> PathBuf {
    tool("kubectl")
}

fn run(command: &mut Command, stdin: Option<&[u8]>) -> Output {
    let mut child = command
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{command:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// YAML documents as a JSON array, read by the PyYAML that ensure_tools installs (no YAML crate
/// in the workspace; serde_yaml is unmaintained).
fn yaml_to_json(yaml: &[u8]) -> Value {
    const SCRIPT: &str =
        "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)";
    let out = run(Command::new(tool("python")).args(["-c", SCRIPT]), Some(yaml));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn pod_spec(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]["spec"]
}

fn pod_labels(deployment: &Value) -> BTreeMap<String, String> {
    labels(&deployment["spec"]["template"]["metadata"]["labels"])
}

fn labels(map: &Value) -> BTreeMap<String, String> {
    map.as_object()
        .into_iter()
        .flatten()
        .map(|(key, value)| (key.clone(), value.as_str().unwrap().to_owned()))
        .collect()
}

fn containers(deployment: &Value) -> impl Iterator<Item = &Value> {
    let spec = pod_spec(deployment);
    spec["containers"].as_array().into_iter().flatten().chain(spec["initContainers"].as_array().into_iter().flatten())
}

fn env_var<'a>(deployment: &'a Value, name: &str) -> Option<&'a Value> {
    containers(deployment).flat_map(|c| c["env"].as_array().into_iter().flatten()).find(|var| var["name"] == name)
}

/// The value of a variable, from a ConfigMap's data or an `env` entry.
fn literal(value: &Value) -> Option<&str> {
    value.as_str().or(value["value"].as_str())
}

fn container_port(container: &Value, name: &str) -> Option<u64> {
    container["ports"].as_array()?.iter().find(|port| port["name"] == name)?["containerPort"].as_u64()
}

/// No Secret objects, no secret variable with a literal value, nothing secret-looking in a
/// ConfigMap.
fn check_no_secret_values(rendered: &Rendered) {
    let overlay = &rendered.overlay;
    assert_eq!(rendered.all("Secret").count(), 0, "{overlay}: a Secret is written in the manifests");
    for deployment in rendered.all("Deployment") {
        for var in containers(deployment).flat_map(|c| c["env"].as_array().into_iter().flatten()) {
            let name = var["name"].as_str().unwrap();
            if SECRET_VARS.contains(&name) || name.contains("SECRET") || name.contains("PASSWORD") {
                assert!(var.get("value").is_none(), "{overlay}: {name} has a literal value");
                assert!(var["valueFrom"]["secretKeyRef"].is_object(), "{overlay}: {name} is not from a Secret");
            }
        }
    }
    for config_map in rendered.all("ConfigMap") {
        for (key, value) in config_map["data"].as_object().into_iter().flatten() {
            assert!(!SECRET_VARS.contains(&key.as_str()), "{overlay}: {key} is in a ConfigMap");
            let value = value.as_str().unwrap();
            let credentials_in_url = value.split_whitespace().any(|word| {
                word.split_once("://").is_some_and(|(_, rest)| rest.split('/').next().unwrap().contains('@'))
            });
            assert!(!credentials_in_url, "{overlay}: ConfigMap key {key} holds a URL with credentials");
        }
    }
}

/// Every pod runs as non-root on a read-only root filesystem, with requests and limits; writable
/// directories are emptyDirs.
fn check_pods_are_locked_down(rendered: &Rendered) {
    let overlay = &rendered.overlay;
    for deployment in rendered.all("Deployment") {
        let name = deployment["metadata"]["name"].as_str().unwrap();
        let pod = pod_spec(deployment);
        assert_eq!(pod["automountServiceAccountToken"], false, "{overlay}: {name} mounts an API token");
        for volume in pod["volumes"].as_array().into_iter().flatten() {
            // Secrets only for certificates, mounted read-only (checked below), never readable
            // by others than the pod's user and group.
            let certificate = volume["secret"].is_object() && volume["secret"]["defaultMode"].as_u64() == Some(0o440);
            assert!(
                volume["emptyDir"].is_object() || volume["configMap"].is_object() || certificate,
                "{overlay}: {name} mounts {volume}"
            );
        }
        for container in containers(deployment) {
            let context = &container["securityContext"];
            let non_root = context["runAsNonRoot"].as_bool().or(pod["securityContext"]["runAsNonRoot"].as_bool());
            assert_eq!(non_root, Some(true), "{overlay}: {name} may run as root");
            let uid = context["runAsUser"].as_u64().or(pod["securityContext"]["runAsUser"].as_u64());
            assert!(uid.is_some_and(|uid| uid != 0), "{overlay}: {name} has no non-zero runAsUser");
            assert_eq!(context["readOnlyRootFilesystem"], true, "{overlay}: {name}");
            assert_eq!(context["allowPrivilegeEscalation"], false, "{overlay}: {name}");
            assert!(
                context["capabilities"]["drop"].as_array().is_some_and(|drop| drop.contains(&Value::from("ALL"))),
                "{overlay}: {name} keeps capabilities"
            );
            for bound in ["requests", "limits"] {
                for resource in ["cpu", "memory"] {
                    assert!(
                        container["resources"][bound][resource].is_string(),
                        "{overlay}: {name} has no {bound}.{resource}"
                    );
                }
            }
            for mount in container["volumeMounts"].as_array().into_iter().flatten() {
                let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap();
                assert!(
                    volume["emptyDir"].is_object() || mount["readOnly"] == true,
                    "{overlay}: {name} writes to {mount} outside an emptyDir"
                );
            }
        }
    }
}

/// Each Keyshare service: its binary, ports, gRPC probes, the configuration it requires, a
/// Service in front, and peers' URLs that lead to it.
fn check_services(rendered: &Rendered) {
    let overlay = &rendered.overlay;
    for &(service, grpc, metrics) in SERVICES {
        let deployment = rendered.get("Deployment", service);
        let container = containers(deployment).next().unwrap();
        assert!(
            container["command"][0].as_str().is_some_and(|command| command.ends_with(&format!("/{service}"))),
            "{overlay}: {service} runs {}",
            container["command"]
        );
        assert_eq!(container_port(container, "grpc"), Some(grpc), "{overlay}: {service}");
        assert_eq!(container_port(container, "metrics"), Some(metrics), "{overlay}: {service}");

        // Every variable the service requires, from the Deployment or its ConfigMap.
        let mut provided: BTreeMap<String, Value> = BTreeMap::new();
        for source in container["envFrom"].as_array().into_iter().flatten() {
            let config_map = rendered.config_map(source["configMapRef"]["name"].as_str().unwrap());
            for (key, value) in config_map["data"].as_object().unwrap() {
                provided.insert(key.clone(), value.clone());
            }
        }
        for var in container["env"].as_array().into_iter().flatten() {
            provided.insert(var["name"].as_str().unwrap().to_owned(), var.clone());
        }
        // Every service authenticates page tokens with the same key, never the built-in one.
        let mut required = vec!["DATABASE_URL", "KEYSHARE_PAGE_TOKEN_KEY"];
        match service {
            "identity" => required.extend(["KEYSHARE_KEY_ENCRYPTION_KEYS", "KEYSHARE_INTERNAL_CLIENTS"]),
            "keyring" => {
                required.extend(["KEYSHARE_KEY_ENCRYPTION_KEYS", "KEYSHARE_CLIENT_ID", "KEYSHARE_CLIENT_SECRET"])
            }
            _ => required.extend(["KEYSHARE_CLIENT_ID", "KEYSHARE_CLIENT_SECRET"]),
        }
        for var in required {
            assert!(provided.contains_key(var), "{overlay}: {service} lacks {var}");
        }
        // The kubelet's gRPC probes speak no TLS: with TLS on they ask the plaintext health port.
        let tls = provided.contains_key("KEYSHARE_TLS_CERT");
        let probe_port = if tls {
            let health = provided.get("KEYSHARE_HEALTH_ADDR").and_then(literal);
            assert_eq!(health, Some(format!("0.0.0.0:{HEALTH_PORT}").as_str()), "{overlay}: {service}");
            assert_eq!(container_port(container, "health"), Some(HEALTH_PORT), "{overlay}: {service}");
            HEALTH_PORT
        } else {
            grpc
        };
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            assert_eq!(
                container[probe]["grpc"]["port"], probe_port,
                "{overlay}: {service} {probe} is not a gRPC probe of its health"
            );
        }
        if let Some(client_id) = provided.get("KEYSHARE_CLIENT_ID") {
            // identity knows internal clients by service name (KEYSHARE_INTERNAL_CLIENTS).
            assert_eq!(literal(client_id), Some(service), "{overlay}");
        }
        let grace: u64 =
            provided.get("KEYSHARE_SHUTDOWN_GRACE_SECS").and_then(literal).unwrap_or("30").parse().unwrap();
        let drain_delay: f64 =
            provided.get("KEYSHARE_DRAIN_DELAY_SECS").and_then(literal).unwrap_or("5").parse().unwrap();
        let termination = pod_spec(deployment)["terminationGracePeriodSeconds"].as_u64().unwrap();
        assert!(
            termination as f64 > grace as f64 + drain_delay,
            "{overlay}: {service} is killed before its {drain_delay} s drain delay and {grace} s drain end"
        );
        // Kubernetes takes a few seconds to take a stopping pod out of its endpoints.
        assert!(drain_delay >= 3.0, "{overlay}: {service} stops answering {drain_delay} s after SIGTERM");
        if service == "authorizer" {
            assert_eq!(container_port(container, "management"), Some(AUTHORIZER_MANAGEMENT), "{overlay}");
            let management = provided.get("KEYSHARE_MANAGEMENT_ADDR").and_then(literal);
            assert_eq!(management, Some(format!("0.0.0.0:{AUTHORIZER_MANAGEMENT}").as_str()), "{overlay}");
        }
        if let Some(spool) = provided.get("KEYSHARE_MAIL_SPOOL_DIR").and_then(literal)
            && ["identity", "invitation"].contains(&service)
        {
            let writable = container["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|mount| spool.starts_with(mount["mountPath"].as_str().unwrap()) && mount["readOnly"] != true);
            assert!(writable, "{overlay}: {service}'s mail spool {spool} is on the read-only root filesystem");
        }

        let svc = rendered.get("Service", service);
        assert!(selector_matches(
            &serde_json::json!({"matchLabels": svc["spec"]["selector"]}),
            &pod_labels(deployment)
        ));
        assert!(
            svc["spec"]["ports"]
                .as_array()
                .unwrap()
                .iter()
                .any(|port| port["port"] == grpc && port["targetPort"] == "grpc"),
            "{overlay}: Service {service} does not expose {grpc}"
        );
        if service == "authorizer" {
            assert!(
                svc["spec"]["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|port| port["port"] == AUTHORIZER_MANAGEMENT && port["targetPort"] == "management"),
                "{overlay}: Service authorizer does not expose its management port"
            );
        }

        // Peers find it where the shared configuration says.
        let config = rendered.config_map("keyshare-config");
        let url_var = format!("KEYSHARE_{}_URL", service.to_ascii_uppercase());
        if let Some(url) = config["data"][&url_var].as_str() {
            let scheme = if tls { "https" } else { "http" };
            assert_eq!(url, format!("{scheme}://{service}:{grpc}"), "{overlay}: {url_var}");
        }
    }
}

/// The gateway carries the label the authorizer admits, and its Envoy configuration is
/// deploy/envoy/envoy.yaml, accepted by Envoy, pointing at the authorizer's Service.
fn check_gateway(rendered: &Rendered) {
    let overlay = &rendered.overlay;
    let gateway = rendered.get("Deployment", "gateway");
    assert_eq!(pod_labels(gateway).get(GATEWAY_LABEL).map(String::as_str), Some("true"), "{overlay}");
    let volume = pod_spec(gateway)["volumes"].as_array().unwrap().iter().find(|v| v["configMap"].is_object()).unwrap();
    let config_map = rendered.config_map(volume["configMap"]["name"].as_str().unwrap());
    let config = config_map["data"]["envoy.yaml"].as_str().unwrap();
    // The example as shipped, or production's copy that adds mTLS to the authorizer.
    let mtls = workspace_root().join("deploy/k8s/overlays").join(overlay).join("envoy-mtls.yaml");
    let shipped = match std::fs::read_to_string(&mtls) {
        Ok(with_tls) => {
            let plain = std::fs::read_to_string(workspace_root().join("deploy/envoy/envoy.yaml")).unwrap();
            let tls_context = with_tls.find("      # Mutual TLS with the authorizer").unwrap();
            let load_assignment = with_tls[tls_context..].find("      load_assignment:").unwrap() + tls_context;
            let without = format!("{}{}", &with_tls[..tls_context], &with_tls[load_assignment..]);
            assert_eq!(without, plain, "{overlay}: envoy-mtls.yaml differs from envoy.yaml by more than mTLS");
            with_tls
        }
        Err(_) => std::fs::read_to_string(workspace_root().join("deploy/envoy/envoy.yaml")).unwrap(),
    };
    assert_eq!(config, shipped, "{overlay}: the gateway's ConfigMap is not the shipped Envoy configuration");

    // Envoy reads the certificate files it names while validating: test ones stand in for the
    // mounted Secret.
    let dir = tempfile::tempdir().unwrap();
    let pki = keyshare_runtime::testkit::TestPki::new("deploy test CA");
    let issued = pki.issue(&["gateway"]);
    std::fs::write(dir.path().join("tls.crt"), &issued.cert_pem).unwrap();
    std::fs::write(dir.path().join("tls.key"), &issued.key_pem).unwrap();
    std::fs::write(dir.path().join("ca.crt"), pki.ca_pem()).unwrap();
    let path = dir.path().join("envoy.yaml");
    std::fs::write(&path, config.replace(TLS_DIR, &dir.path().display().to_string())).unwrap();
    run(Command::new(tool("envoy")).args(["--mode", "validate", "--disable-hot-restart", "-c"]).arg(&path), None);

    let envoy = yaml_to_json(config.as_bytes());
    let cluster = envoy[0]["static_resources"]["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|cluster| cluster["name"] == "keyshare_authorizer")
        .unwrap();
    let address =
        &cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"];
    let service = rendered.get("Service", address["address"].as_str().unwrap());
    assert!(service["spec"]["ports"].as_array().unwrap().iter().any(|port| port["port"] == address["port_value"]));
    // STRICT_DNS sees every authorizer pod only through a headless Service.
    assert_eq!(cluster["type"], "STRICT_DNS");
    assert_eq!(service["spec"]["clusterIP"], "None", "{overlay}: the authorizer's Service is not headless");
    let listen = envoy[0]["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"].as_u64();
    assert_eq!(listen, container_port(containers(gateway).next().unwrap(), "http"), "{overlay}");
}

/// Who may reach whom, worked out from the rendered NetworkPolicies for a set of pods and
/// compared with the intended matrix.
fn check_network_policies(rendered: &Rendered) {
    let overlay = &rendered.overlay;
    let namespace = rendered.namespace();
    let policies: Vec<&Value> = rendered.all("NetworkPolicy").collect();
    let pod = |labels: BTreeMap<String, String>| Endpoint::Pod { namespace: namespace.clone(), labels };
    let mut sources: Vec<(&str, Endpoint)> = SERVICES
        .iter()
        .map(|(service, _, _)| (*service, pod(pod_labels(rendered.get("Deployment", service)))))
        .collect();
    sources.push(("gateway", pod(pod_labels(rendered.get("Deployment", "gateway")))));
    sources.push(("client", pod(BTreeMap::from([("keyshare.dev/client".to_owned(), "true".to_owned())]))));
    sources.push(("stranger", pod(BTreeMap::from([("app".to_owned(), "other".to_owned())]))));
    sources.push(("ingress", Endpoint::Pod { namespace: "ingress-nginx".into(), labels: BTreeMap::new() }));
    sources.push(("prometheus", Endpoint::Pod { namespace: "monitoring".into(), labels: BTreeMap::new() }));
    sources.push(("outside", Endpoint::Outside));

    for (source, from) in &sources {
        for &(service, grpc, metrics) in SERVICES {
            let to = pod(pod_labels(rendered.get("Deployment", service)));
            let expected_grpc = matches!(
                (*source, service),
                ("client" | "ingress", "identity" | "keyring" | "invitation")
                    | ("gateway", "authorizer")
                    | ("keyring" | "invitation" | "authorizer", "identity")
                    | ("identity" | "invitation" | "authorizer", "keyring")
                    | ("keyring", "invitation")
            );
            let grpc_open = allowed(&policies, from, &to, grpc, "TCP");
            assert_eq!(grpc_open, expected_grpc, "{overlay}: {source} -> {service}:{grpc}");
            let metrics_open = allowed(&policies, from, &to, metrics, "TCP");
            assert_eq!(metrics_open, *source == "prometheus", "{overlay}: {source} -> {service}:{metrics}");
        }
        // Gateways reach the checks only; people and the ingress the usage statistics only.
        let authorizer = pod(pod_labels(rendered.get("Deployment", "authorizer")));
        let management_open = allowed(&policies, from, &authorizer, AUTHORIZER_MANAGEMENT, "TCP");
        assert_eq!(
            management_open,
            matches!(*source, "client" | "ingress"),
            "{overlay}: {source} -> authorizer:{AUTHORIZER_MANAGEMENT}"
        );
    }

    // Out of the cluster (or to the database's pods when it runs in the namespace).
    let database = match rendered.all("Cluster").next() {
        Some(cluster) => pod(BTreeMap::from([(
            "cnpg.io/cluster".to_owned(),
            cluster["metadata"]["name"].as_str().unwrap().to_owned(),
        )])),
        None => Endpoint::Outside,
    };
    for (source, from) in sources.iter().take(SERVICES.len()) {
        assert!(allowed(&policies, from, &database, 5432, "TCP"), "{overlay}: {source} -> database");
        if database != Endpoint::Outside {
            assert!(!allowed(&policies, from, &Endpoint::Outside, 5432, "TCP"), "{overlay}: {source} -> outside:5432");
        }
        assert!(allowed(&policies, from, &Endpoint::Outside, 53, "UDP"), "{overlay}: {source} -> DNS");
        assert!(allowed(&policies, from, &Endpoint::Outside, 4317, "TCP"), "{overlay}: {source} -> OTLP");
        let sends_mail = ["identity", "invitation"].contains(source);
        assert_eq!(allowed(&policies, from, &Endpoint::Outside, 587, "TCP"), sends_mail, "{overlay}: {source} -> SMTP");
        assert!(!allowed(&policies, from, &Endpoint::Outside, 443, "TCP"), "{overlay}: {source} -> outside:443");
    }
}

/// Either end of a connection.
#[derive(Debug, PartialEq)]
enum Endpoint {
    Pod {
        namespace: String,
        labels: BTreeMap<String, String>,
    },
    /// Anything outside the cluster: an external database, an SMTP server, the internet.
    Outside,
}

/// Whether the policies let `from` open a connection to `to` on `port`: the destination's
/// ingress and the source's egress must both allow it (Kubernetes NetworkPolicy semantics).
fn allowed(policies: &[&Value], from: &Endpoint, to: &Endpoint, port: u64, protocol: &str) -> bool {
    direction_allows(policies, to, from, "Ingress", "ingress", "from", port, protocol)
        && direction_allows(policies, from, to, "Egress", "egress", "to", port, protocol)
}

#[allow(clippy::too_many_arguments)]
fn direction_allows(
    policies: &[&Value],
    subject: &Endpoint,
    peer: &Endpoint,
    policy_type: &str,
    rules_key: &str,
    peers_key: &str,
    port: u64,
    protocol: &str,
) -> bool {
    let Endpoint::Pod { namespace, labels } = subject else { return true };
    let applicable: Vec<&Value> = policies
        .iter()
        .copied()
        .filter(|policy| policy["metadata"]["namespace"] == namespace.as_str())
        .filter(|policy| selector_matches(&policy["spec"]["podSelector"], labels))
        .filter(|policy| match policy["spec"]["policyTypes"].as_array() {
            Some(types) => types.contains(&Value::from(policy_type)),
            None => policy_type == "Ingress" || policy["spec"].get(rules_key).is_some(),
        })
        .collect();
    if applicable.is_empty() {
        return true;
    }
    applicable.iter().flat_map(|policy| policy["spec"][rules_key].as_array().into_iter().flatten()).any(|rule| {
        let peers = rule[peers_key].as_array().filter(|peers| !peers.is_empty());
        let peer_ok = peers.is_none_or(|peers| peers.iter().any(|p| peer_matches(p, namespace, peer)));
        let ports = rule["ports"].as_array().filter(|ports| !ports.is_empty());
        let port_ok = ports.is_none_or(|ports| {
            ports.iter().any(|p| {
                p["protocol"].as_str().unwrap_or("TCP") == protocol
                    && p["port"].as_u64().expect("ports are numbers in these policies") == port
            })
        });
        peer_ok && port_ok
    })
}

fn peer_matches(peer: &Value, policy_namespace: &str, endpoint: &Endpoint) -> bool {
    assert!(peer.get("ipBlock").is_none(), "ipBlock peers are not modelled by this test: {peer}");
    let Endpoint::Pod { namespace, labels } = endpoint else { return false };
    let namespace_ok = match peer.get("namespaceSelector") {
        None => namespace == policy_namespace,
        Some(selector) => {
            selector_matches(selector, &BTreeMap::from([("kubernetes.io/metadata.name".to_owned(), namespace.clone())]))
        }
    };
    let pod_ok = peer.get("podSelector").is_none_or(|selector| selector_matches(selector, labels));
    namespace_ok && pod_ok
}

/// A label selector (matchLabels and matchExpressions); the empty selector matches everything.
fn selector_matches(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    let label_ok = selector["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .all(|(key, value)| labels.get(key).map(String::as_str) == value.as_str());
    let expressions_ok = selector["matchExpressions"].as_array().into_iter().flatten().all(|expression| {
        let have = labels.get(expression["key"].as_str().unwrap());
        let values: Vec<&str> =
            expression["values"].as_array().into_iter().flatten().map(|v| v.as_str().unwrap()).collect();
        match expression["operator"].as_str().unwrap() {
            "In" => have.is_some_and(|have| values.contains(&have.as_str())),
            "NotIn" => have.is_none_or(|have| !values.contains(&have.as_str())),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            other => panic!("unknown selector operator {other}"),
        }
    });
    label_ok && expressions_ok
}

/// Secret name → keys, from the `kubectl create secret generic NAME --from-literal=KEY=…`
/// commands of a README section.
fn documented_secrets(section: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut secrets: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for command in section.split("create secret generic ").skip(1) {
        // The command runs to the end of its (possibly continued) line.
        let mut text = String::new();
        for line in command.lines() {
            text.push_str(line);
            if !line.trim_end().ends_with('\\') {
                break;
            }
        }
        let mut words = text.split_whitespace();
        let name = words.next().unwrap().to_owned();
        let keys = secrets.entry(name).or_default();
        for word in words {
            if let Some(literal) = word.strip_prefix("--from-literal=") {
                let key = literal.split('=').next().unwrap();
                keys.insert(key.trim_matches(|c| c == '"' || c == '\'').to_owned());
            }
        }
    }
    secrets
}
