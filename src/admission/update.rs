//! Pod UPDATEs (the main resource, `pods/status` and `pods/ephemeralcontainers`). The webhook
//! decides only at CREATE; afterwards nothing may undo that decision:
//!
//! - the owned annotations (stamps and signature) never change, for anyone;
//! - a pod holding granted secrets keeps its images and takes no ephemeral containers, since
//!   either runs new code next to those secrets (an ephemeral container can share the target's
//!   process namespace and read its environment);
//! - no update may add a direct reference to a managed store (ephemeral containers are the only
//!   part of a pod's spec that can, and are never planned).

use k8s_openapi::api::core::v1::{Container, Pod};
use kube::core::admission::AdmissionRequest;

use super::{Denial, guard, lines};
use crate::backends::Naming;
use crate::identity::stamps;

/// Checks one pod UPDATE; `Ok` admits it unchanged.
pub(super) fn check(req: &AdmissionRequest<Pod>, naming: &Naming) -> Result<(), Denial> {
    let (Some(new), Some(old)) = (req.object.as_ref(), req.old_object.as_ref()) else {
        return Err(Denial::new(
            "malformed",
            "the AdmissionReview of a pod update carries no object or no oldObject",
        ));
    };
    let changed = stamps::changed(old, new);
    if !changed.is_empty() {
        return Err(Denial::new(
            "owned-annotation",
            format!(
                "annotation{} {} {} set by secrets-webhook when the pod is created and cannot be added, \
                 changed or removed afterwards, by anyone",
                if changed.len() == 1 { "" } else { "s" },
                changed.join(", "),
                if changed.len() == 1 { "is" } else { "are" },
            ),
        ));
    }
    if stamps::holds_grants(old) {
        let mut problems = Vec::new();
        let spec = |p: &Pod| p.spec.clone().unwrap_or_default();
        let (old_spec, new_spec) = (spec(old), spec(new));
        for (field, old_list, new_list) in [
            (
                "containers",
                Some(&old_spec.containers),
                Some(&new_spec.containers),
            ),
            (
                "initContainers",
                old_spec.init_containers.as_ref(),
                new_spec.init_containers.as_ref(),
            ),
        ] {
            problems.extend(image_changes(field, old_list, new_list));
        }
        let old_names: Vec<&str> = old_spec
            .ephemeral_containers
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        let added = new_spec
            .ephemeral_containers
            .iter()
            .flatten()
            .filter(|c| !old_names.contains(&c.name.as_str()))
            .count();
        if added > 0 {
            problems.push(
                "ephemeral containers cannot be added: one could read the environment of the pod's \
                 containers; debug a copy instead (kubectl debug --copy-to), which is admitted for you"
                    .to_string(),
            );
        }
        if !problems.is_empty() {
            return Err(Denial::new(
                "holds-grants",
                format!(
                    "this pod holds secrets granted by secrets-webhook, so no new code may run in it:\n{}",
                    lines(problems)
                ),
            ));
        }
    }
    let before = guard::direct_store_refs(old, naming);
    let added: Vec<guard::DirectRef> = guard::direct_store_refs(new, naming)
        .into_iter()
        .filter(|r| !before.contains(r))
        .collect();
    if added.is_empty() {
        Ok(())
    } else {
        Err(Denial::new(
            "direct-store-reference",
            guard::GuardError(added).to_string(),
        ))
    }
}

/// `containers[name].image` for each container whose image differs between the two versions.
fn image_changes(
    field: &str,
    old: Option<&Vec<Container>>,
    new: Option<&Vec<Container>>,
) -> Vec<String> {
    let old = old.map(Vec::as_slice).unwrap_or_default();
    new.map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|c| {
            old.iter()
                .find(|o| o.name == c.name)
                .is_none_or(|o| o.image != c.image)
        })
        .map(|c| {
            format!(
                "{field}[{}].image cannot change; create a new pod instead",
                crate::refs::shown_name(&c.name)
            )
        })
        .collect()
}
