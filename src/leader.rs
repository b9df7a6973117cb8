//! Leader election on a `coordination.k8s.io/v1` Lease, the way client-go does it: a candidate
//! takes the Lease only once its record has not changed for a whole lease duration, measured on
//! the candidate's own clock (no trust in other clocks); the leader renews it every retry
//! period and counts itself leader only until `renew deadline` (two thirds of the duration)
//! after the last renewal it sent that succeeded. So a leader that cannot renew stops before
//! any other replica may start, and the process exits then (`--leader-elect`): no write of it
//! follows. Written here rather than taken from `kube-lease-manager`, whose leader keeps
//! reporting itself leader while its renewals fail.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference};
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use tokio::sync::watch;

use crate::names::ANNOTATION_XDS_ADDRESS;

/// Where the Lease is and who this replica is.
#[derive(Debug, Clone)]
pub struct Config {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    /// How long a Lease is valid after its last renewal.
    pub duration: Duration,
    /// Where this replica serves ECDS for the others to relay to, written on the Lease while
    /// it leads.
    pub xds_address: Option<String>,
    /// What owns the Lease (the operator's Deployment), so it goes when the install goes.
    pub owner: Option<OwnerReference>,
}

impl Config {
    /// How long the leader keeps leading without a successful renewal.
    pub fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    /// How often the leader renews and candidates look.
    pub fn retry_period(&self) -> Duration {
        (self.duration / 5).max(Duration::from_millis(200))
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }
}

/// What a replica may do with the Lease as it reads now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// There is none: create it, holding it.
    Create,
    /// Write it holding it (renew its own, take a free or expired one); the resourceVersion
    /// makes a concurrent writer lose.
    Write,
    /// Another replica holds it and it has not expired yet.
    Wait,
}

/// `unchanged_for`: how long this replica has seen the Lease's current record unchanged.
fn decide(
    lease: Option<&LeaseSpec>,
    me: &str,
    unchanged_for: Duration,
    fallback: Duration,
) -> Step {
    let Some(spec) = lease else {
        return Step::Create;
    };
    match spec.holder_identity.as_deref().filter(|h| !h.is_empty()) {
        None => Step::Write,
        Some(holder) if holder == me => Step::Write,
        Some(_) => {
            let valid = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(fallback, Duration::from_secs);
            if unchanged_for >= valid {
                Step::Write
            } else {
                Step::Wait
            }
        }
    }
}

/// The record a replica last saw, and since when (its own clock).
struct Observed {
    resource_version: Option<String>,
    since: Instant,
}

pub struct Elector {
    api: Api<Lease>,
    config: Config,
    leading: watch::Sender<bool>,
    observed: Mutex<Option<Observed>>,
    /// Set once the Lease was given up: never take it again.
    released: AtomicBool,
    /// Where the replica that holds the Lease (another one) serves ECDS, as last read.
    leader_xds: Mutex<Option<String>>,
}

impl Elector {
    pub fn new(client: kube::Client, config: Config) -> Self {
        Elector {
            api: Api::namespaced(client, &config.namespace),
            config,
            leading: watch::channel(false).0,
            observed: Mutex::new(None),
            released: AtomicBool::new(false),
            leader_xds: Mutex::new(None),
        }
    }

    /// Where the leader serves ECDS, when another replica leads and said so on the Lease (as
    /// of this replica's last look, at most a retry period ago).
    pub fn leader_xds(&self) -> Option<String> {
        self.leader_xds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn is_leading(&self) -> bool {
        *self.leading.borrow()
    }

    /// Whether this replica gave the Lease up (on shutdown), rather than lost it.
    pub fn is_released(&self) -> bool {
        self.released.load(Ordering::SeqCst)
    }

    /// Waits until this replica holds the Lease, then keeps it (renewing in the background)
    /// until it cannot: [`Elector::lost`] says when.
    pub async fn lead(self: &std::sync::Arc<Self>) {
        let retry = self.config.retry_period();
        let renewed = loop {
            let sent = Instant::now();
            match self.try_acquire_or_renew().await {
                Ok(true) => break sent,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "cannot read or write the leader Lease"),
            }
            tokio::time::sleep(retry.mul_f64(1.0 + fastrand::f64() * 0.2)).await;
        };
        self.leading.send_replace(true);
        tokio::spawn(self.clone().keep(renewed));
    }

    /// Resolves once this replica no longer leads (it lost the Lease or gave it up).
    pub async fn lost(&self) {
        let mut rx = self.leading.subscribe();
        let _ = rx.wait_for(|leading| !leading).await;
    }

    /// Renews every retry period; leads until `renew deadline` after the last renewal that
    /// was sent and succeeded.
    async fn keep(self: std::sync::Arc<Self>, mut renewed: Instant) {
        let retry = self.config.retry_period();
        let deadline = self.config.renew_deadline();
        loop {
            tokio::time::sleep(retry).await;
            if self.released.load(Ordering::SeqCst) {
                return;
            }
            let sent = Instant::now();
            let left = (renewed + deadline).saturating_duration_since(sent);
            match tokio::time::timeout(left, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => renewed = sent,
                Ok(Ok(false)) => {
                    tracing::error!("another replica holds the leader Lease");
                    break;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "could not renew the leader Lease"),
                Err(_) => tracing::warn!("renewing the leader Lease timed out"),
            }
            if Instant::now() >= renewed + deadline {
                tracing::error!(
                    ?deadline,
                    "no renewal of the leader Lease within the deadline"
                );
                break;
            }
        }
        self.leading.send_replace(false);
    }

    /// One look at the Lease, and a write when this replica may hold it; whether it holds it.
    async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        if self.released.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let name = &self.config.name;
        let me = &self.config.identity;
        let now = MicroTime(jiff::Timestamp::now());
        let current = self.api.get_opt(name).await?;
        let unchanged_for = {
            let mut observed = self.observed.lock().unwrap_or_else(|p| p.into_inner());
            let rv = current
                .as_ref()
                .and_then(|l| l.metadata.resource_version.clone());
            match observed.as_ref() {
                Some(o) if o.resource_version == rv => o.since.elapsed(),
                _ => {
                    *observed = Some(Observed {
                        resource_version: rv,
                        since: Instant::now(),
                    });
                    Duration::ZERO
                }
            }
        };
        let spec = current.as_ref().and_then(|l| l.spec.as_ref());
        let other = spec
            .and_then(|s| s.holder_identity.as_deref())
            .is_some_and(|h| !h.is_empty() && h != me.as_str());
        *self.leader_xds.lock().unwrap_or_else(|p| p.into_inner()) = current
            .as_ref()
            .filter(|_| other)
            .and_then(|l| l.metadata.annotations.as_ref())
            .and_then(|a| a.get(ANNOTATION_XDS_ADDRESS).cloned());
        match decide(spec, me, unchanged_for, self.config.duration) {
            Step::Wait => Ok(false),
            Step::Create => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(self.config.namespace.clone()),
                        annotations: self
                            .config
                            .xds_address
                            .as_ref()
                            .map(|a| [(ANNOTATION_XDS_ADDRESS.to_string(), a.clone())].into()),
                        owner_references: self.config.owner.clone().map(|o| vec![o]),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(me.clone()),
                        lease_duration_seconds: Some(self.config.duration_seconds()),
                        acquire_time: Some(now.clone()),
                        renew_time: Some(now),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => {
                        tracing::info!(lease = %name, identity = %me, "created and holds the leader Lease");
                        Ok(true)
                    }
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Step::Write => {
                let mut lease = current.unwrap_or_default();
                let mut spec = lease.spec.take().unwrap_or_default();
                if spec.holder_identity.as_deref() != Some(me.as_str()) {
                    tracing::info!(lease = %name, identity = %me, previous = ?spec.holder_identity, "taking the leader Lease");
                    spec.acquire_time = Some(now.clone());
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.holder_identity = Some(me.clone());
                spec.renew_time = Some(now);
                spec.lease_duration_seconds = Some(self.config.duration_seconds());
                lease.spec = Some(spec);
                set_xds_address(&mut lease, self.config.xds_address.as_deref());
                set_owner(&mut lease, self.config.owner.as_ref());
                match self.api.replace(name, &PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    // Someone else wrote it since this replica read it.
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Gives the Lease up (on shutdown, once nothing of this replica is in flight), so another
    /// replica takes over at its next look instead of a lease duration later. Bounded.
    pub async fn release(&self) {
        self.released.store(true, Ordering::SeqCst);
        if !self.is_leading() {
            return;
        }
        self.leading.send_replace(false);
        let give_up = async {
            let mut lease = self.api.get(&self.config.name).await?;
            let Some(spec) = lease.spec.as_mut() else {
                return Ok(());
            };
            if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
                return Ok(());
            }
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
            set_xds_address(&mut lease, None);
            self.api
                .replace(&self.config.name, &PostParams::default(), &lease)
                .await
                .map(|_| ())
        };
        match tokio::time::timeout(Duration::from_secs(2), give_up).await {
            Ok(Ok(())) => tracing::info!("released the leader Lease"),
            Ok(Err(e)) => tracing::warn!(error = %e, "could not release the leader Lease"),
            Err(_) => tracing::warn!("releasing the leader Lease timed out"),
        }
    }
}

/// Adds the owner to the Lease's owner references, once (a Lease an older version created
/// gains it at the next renewal).
fn set_owner(lease: &mut Lease, owner: Option<&OwnerReference>) {
    let Some(owner) = owner else { return };
    let owners = lease.metadata.owner_references.get_or_insert_default();
    if !owners.iter().any(|o| o.uid == owner.uid) {
        owners.push(owner.clone());
    }
}

/// The owner reference for the Deployment `name` in `namespace`, so the garbage collector
/// deletes the Lease with it (`helm uninstall`, `kubectl delete -k`). None, with a warning,
/// when it cannot be read: leading does not depend on it.
pub async fn deployment_owner(
    client: kube::Client,
    namespace: &str,
    name: &str,
) -> Option<OwnerReference> {
    let api: Api<Deployment> = Api::namespaced(client, namespace);
    let read = tokio::time::timeout(Duration::from_secs(10), api.get(name)).await;
    match read {
        Ok(Ok(deployment)) => Some(OwnerReference {
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            name: name.to_string(),
            uid: deployment.metadata.uid.unwrap_or_default(),
            ..OwnerReference::default()
        })
        .filter(|o| !o.uid.is_empty()),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, deployment = name, "cannot read the operator's Deployment: the leader Lease will outlive it");
            None
        }
        Err(_) => {
            tracing::warn!(
                deployment = name,
                "reading the operator's Deployment timed out: the leader Lease will outlive it"
            );
            None
        }
    }
}

/// Says on the Lease where its holder serves ECDS (or, with `None`, that nobody does).
fn set_xds_address(lease: &mut Lease, address: Option<&str>) {
    let annotations = lease.metadata.annotations.get_or_insert_default();
    match address {
        Some(a) => {
            annotations.insert(ANNOTATION_XDS_ADDRESS.to_string(), a.to_string());
        }
        None => {
            annotations.remove(ANNOTATION_XDS_ADDRESS);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_is_added_once_beside_other_owners() {
        let owner = |uid: &str| OwnerReference {
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            name: "op".into(),
            uid: uid.into(),
            ..OwnerReference::default()
        };
        let mut lease = Lease::default();
        set_owner(&mut lease, None);
        assert_eq!(lease.metadata.owner_references, None);
        lease.metadata.owner_references = Some(vec![owner("other")]);
        set_owner(&mut lease, Some(&owner("u1")));
        set_owner(&mut lease, Some(&owner("u1")));
        let uids: Vec<_> = lease
            .metadata
            .owner_references
            .unwrap()
            .into_iter()
            .map(|o| o.uid)
            .collect();
        assert_eq!(uids, ["other", "u1"]);
    }

    fn held_by(holder: Option<&str>, secs: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(String::from),
            lease_duration_seconds: Some(secs),
            ..LeaseSpec::default()
        }
    }

    const FALLBACK: Duration = Duration::from_secs(15);

    #[test]
    fn a_missing_free_or_own_lease_is_taken() {
        assert_eq!(decide(None, "a", Duration::ZERO, FALLBACK), Step::Create);
        assert_eq!(
            decide(Some(&held_by(None, 4)), "a", Duration::ZERO, FALLBACK),
            Step::Write
        );
        assert_eq!(
            decide(Some(&held_by(Some(""), 4)), "a", Duration::ZERO, FALLBACK),
            Step::Write,
            "released"
        );
        assert_eq!(
            decide(Some(&held_by(Some("a"), 4)), "a", Duration::ZERO, FALLBACK),
            Step::Write,
            "renewal"
        );
    }

    #[test]
    fn another_holder_is_waited_for_a_whole_duration_of_an_unchanged_record() {
        let b = held_by(Some("b"), 4);
        assert_eq!(decide(Some(&b), "a", Duration::ZERO, FALLBACK), Step::Wait);
        assert_eq!(
            decide(Some(&b), "a", Duration::from_millis(3999), FALLBACK),
            Step::Wait
        );
        assert_eq!(
            decide(Some(&b), "a", Duration::from_secs(4), FALLBACK),
            Step::Write
        );
        let no_duration = LeaseSpec {
            holder_identity: Some("b".into()),
            ..LeaseSpec::default()
        };
        assert_eq!(
            decide(Some(&no_duration), "a", Duration::from_secs(5), FALLBACK),
            Step::Wait
        );
    }

    #[test]
    fn the_leader_stops_before_a_candidate_may_start() {
        let c = Config {
            namespace: "n".into(),
            name: "l".into(),
            identity: "a".into(),
            duration: Duration::from_secs(15),
            xds_address: None,
            owner: None,
        };
        assert!(c.renew_deadline() + c.retry_period() < c.duration);
        assert_eq!(c.duration_seconds(), 15);
    }
}
