//! The `swarm:` section of a manifest: the service the `swarm` driver creates on a Docker
//! Swarm, one per key.
//!
//! ```yaml
//! driver: swarm
//! command: [/bin/server, --port, "${PORT}"]
//! swarm:
//!   image: registry.example/app:1.4     # required; it must be on every node (no pull)
//!   constraints: ["node.labels.zone==a"] # placement constraints, as `docker service create`
//!   init: true                           # an init as PID 1 (the default)
//!   workdir: /srv                        # the working directory inside the container
//! resources: { cpu: 0.5, memory: 64Mi, pids: 100 }   # the task's limits
//! readiness:                             # becomes the container's HEALTHCHECK
//!   exec: [test, -f, /tmp/ready]         # or http: / tcp: (run inside the task with
//!                                        # the image's `wget` / `nc`)
//! ```
//!
//! What the driver cannot honour for a task on another node is refused when the manifest
//! is read, naming the field ([`validate`]): listening sockets (`sockets:`,
//! `activation:`), `readiness.notify` (and so the watchdog), `liveness` (the readiness
//! probe is the task's health check, and the engine stops an unhealthy task), channels
//! (shared memory is per host), `resources.cpuset`, `umask`.

use serde::{Deserialize, Serialize};

use crate::spec::WorkloadSpec;

/// The `swarm:` section.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwarmSpec {
    /// The image, used as is: every node that may run the task must have it (bulkhead
    /// pulls nothing).
    pub image: String,
    /// Placement constraints (`node.role==worker`, `node.labels.zone==a`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<String>,
    /// An init as PID 1 that forwards signals and reaps orphans (default on, as the
    /// docker driver).
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub init: bool,
    /// The working directory inside the container (default: the image's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
}

fn default_true() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// Checks `spec`'s fields against what the swarm driver can do, and its `swarm:`
/// section. Called for every manifest; says nothing unless the section is there or the
/// driver is `swarm`. On error: the field and the reason.
pub fn validate(spec: &WorkloadSpec) -> Result<(), (String, String)> {
    use crate::spec::DriverKind;
    let is_swarm = spec.driver == DriverKind::Swarm;
    let fail = |f: &str, r: &str| Err((f.to_owned(), r.to_owned()));
    let Some(sw) = &spec.swarm else {
        return if is_swarm {
            fail("swarm", "is required with driver: swarm (set swarm.image)")
        } else {
            Ok(())
        };
    };
    if !is_swarm {
        return fail(
            "swarm",
            &format!(
                "is only allowed with driver: swarm (this workload uses driver: {})",
                spec.driver
            ),
        );
    }
    let printable = |s: &str| !s.is_empty() && s.len() <= 512 && !s.chars().any(char::is_control);
    if !printable(&sw.image) {
        return fail(
            "swarm.image",
            "must name an image (printable, at most 512 bytes)",
        );
    }
    for (i, c) in sw.constraints.iter().enumerate() {
        if !printable(c) || !(c.contains("==") || c.contains("!=")) {
            return Err((
                format!("swarm.constraints[{i}]"),
                "must be an expression like node.labels.zone==a (== or !=)".into(),
            ));
        }
    }
    if let Some(w) = &sw.workdir {
        if !w.starts_with('/') || !printable(w) {
            return fail(
                "swarm.workdir",
                "must be an absolute path inside the container",
            );
        }
        if spec.working_dir.is_some() {
            return fail(
                "working_dir",
                "and swarm.workdir both set the working directory: keep one",
            );
        }
    }
    let why = "with driver: swarm the task runs on another node";
    if let Some(w) = &spec.working_dir {
        if !w.starts_with('/') {
            return fail(
                "working_dir",
                "must be an absolute path inside the container with driver: swarm",
            );
        }
    }
    if spec.sockets.is_some() {
        return fail(
            "sockets",
            &format!("not supported: {why}, where the daemon cannot hand it listening sockets"),
        );
    }
    if spec.activation.is_some() {
        return fail(
            "activation",
            &format!("not supported: {why}, and is started at launch"),
        );
    }
    if let Some(r) = &spec.readiness {
        if r.notify {
            return fail(
                "readiness.notify",
                &format!(
                    "not supported: {why} and cannot reach the daemon's notify socket; use an \
                     exec, http or tcp probe (it becomes the task's health check)"
                ),
            );
        }
        if [r.http.is_some(), r.tcp.is_some(), r.exec.is_some()]
            .iter()
            .filter(|x| **x)
            .count()
            > 1
        {
            return fail(
                "readiness",
                "names more than one probe: with driver: swarm one probe becomes the task's \
                 health check",
            );
        }
    }
    if spec.liveness.is_some() {
        return fail(
            "liveness",
            "not supported with driver: swarm: the readiness probe is the task's health \
             check, and the engine stops a task that turns unhealthy",
        );
    }
    if spec.channels.is_some() {
        return fail(
            "channels",
            &format!("not supported: {why}, and channels are shared memory on this host"),
        );
    }
    if spec.resources.as_ref().is_some_and(|r| r.cpuset.is_some()) {
        return fail(
            "resources.cpuset",
            "not supported with driver: swarm (a service has no cpuset limit)",
        );
    }
    if spec.umask.is_some() {
        return fail(
            "umask",
            "cannot be set with driver: swarm (the engine has no umask setting; set it in the \
             image's entrypoint)",
        );
    }
    if spec.group.is_some() && spec.user.is_none() {
        return fail(
            "group",
            "needs user with driver: swarm (the container's user is user:group)",
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::spec::parse_manifest;

    fn parse(extra: &str) -> Result<crate::spec::WorkloadSpec, String> {
        let text = format!("name: w\ncommand: [sh]\n{extra}");
        parse_manifest("w/manifest.yaml", "w", &text).map_err(|e| e.to_string())
    }

    const OK: &str = "driver: swarm\nswarm: {image: busybox}\n";

    #[test]
    fn a_swarm_section_parses_with_its_defaults() {
        let w = parse(&format!(
            "{OK}resources: {{memory: 64Mi, cpu: 0.5, pids: 10}}\n"
        ))
        .unwrap();
        let sw = w.swarm.unwrap();
        assert_eq!(sw.image, "busybox");
        assert!(sw.init);
        assert!(sw.constraints.is_empty());
        let w = parse(
            "driver: swarm\nswarm: {image: b, constraints: [node.role==worker], init: false, \
             workdir: /srv}\n",
        )
        .unwrap();
        assert_eq!(w.swarm.unwrap().constraints, ["node.role==worker"]);
    }

    #[test]
    fn the_driver_and_its_section_go_together() {
        let e = parse("driver: swarm\n").unwrap_err();
        assert!(
            e.contains("w/manifest.yaml") && e.contains("field `swarm`"),
            "{e}"
        );
        let e = parse("swarm: {image: b}\n").unwrap_err();
        assert!(
            e.contains("field `swarm`") && e.contains("driver: process"),
            "{e}"
        );
        let e = parse("driver: swarm\nswarm: {image: b, extra: 1}\n").unwrap_err();
        assert!(e.contains("extra"), "{e}");
    }

    #[test]
    fn what_the_swarm_driver_cannot_honour_is_refused_naming_the_field() {
        let cases = [
            (
                "sockets: [{name: http, listen: \"127.0.0.1:0\"}]\n",
                "sockets",
            ),
            ("readiness: {notify: true}\n", "readiness.notify"),
            (
                "readiness: {exec: [\"true\"], tcp: {port: 80}}\n",
                "readiness",
            ),
            ("liveness: {exec: [\"true\"]}\n", "liveness"),
            ("resources: {cpuset: \"0\"}\n", "resources.cpuset"),
            ("umask: \"077\"\n", "umask"),
            ("working_dir: rel\n", "working_dir"),
            ("group: \"5\"\n", "group"),
        ];
        for (extra, field) in cases {
            let e = parse(&format!("{OK}{extra}")).unwrap_err();
            assert!(
                e.contains("w/manifest.yaml") && e.contains(&format!("field `{field}`")),
                "{extra}: {e}"
            );
        }
        for (sw, field) in [
            ("{image: \"\"}", "swarm.image"),
            ("{image: b, constraints: [zone]}", "swarm.constraints[0]"),
            ("{image: b, workdir: rel}", "swarm.workdir"),
        ] {
            let e = parse(&format!("driver: swarm\nswarm: {sw}\n")).unwrap_err();
            assert!(e.contains(&format!("field `{field}`")), "{sw}: {e}");
        }
        // The same fields are fine with the probes the driver maps.
        assert!(parse(&format!("{OK}readiness: {{tcp: {{port: 80}}}}\n")).is_ok());
        assert!(parse(&format!(
            "{OK}working_dir: /srv\nuser: \"1\"\ngroup: \"2\"\n"
        ))
        .is_ok());
    }
}
