//! Trusted controllers: requesters that create pods on behalf of a user named in an annotation
//! (JupyterHub's hub, the Spark operator, the platform's control plane). From anyone else those
//! annotations are ignored.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// The webhook's own on-behalf-of annotation (the default `userAnnotation` of trusted controllers).
pub const RUN_AS: &str = "secrets.iomete.com/run-as";
/// The webhook's own on-behalf-of groups annotation (comma-separated).
pub const RUN_AS_GROUPS: &str = "secrets.iomete.com/run-as-groups";

/// One trusted controller as the config file writes it (`trustedControllers:`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrustedController {
    /// The controller's username, e.g. `system:serviceaccount:jhub:hub`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Or a group whose members are trusted, e.g. `system:serviceaccounts:spark-operator`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Pod annotation naming the user the controller submits for.
    #[serde(default = "default_user_annotation")]
    pub user_annotation: String,
    /// Optional pod annotation with that user's groups, comma-separated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups_annotation: Option<String>,
}

fn default_user_annotation() -> String {
    RUN_AS.to_string()
}

/// Why the trusted-controller configuration is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustedConfigError {
    #[error(
        "trustedControllers[{0}] must name exactly one of `username` or `group` (the requester to trust)"
    )]
    Requester(usize),
    #[error("trustedControllers[{0}].userAnnotation is empty")]
    EmptyAnnotation(usize),
}

/// The validated set of trusted controllers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedControllers {
    entries: Vec<TrustedController>,
    /// Every annotation that names a user on whose behalf a pod is created: each entry's
    /// `userAnnotation`, and [`RUN_AS`].
    user_annotations: BTreeSet<String>,
    /// Every annotation that names that user's groups: each entry's `groupsAnnotation`, and
    /// [`RUN_AS_GROUPS`].
    groups_annotations: BTreeSet<String>,
}

impl Default for TrustedControllers {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            user_annotations: BTreeSet::from([RUN_AS.to_string()]),
            groups_annotations: BTreeSet::from([RUN_AS_GROUPS.to_string()]),
        }
    }
}

impl TrustedControllers {
    pub fn new(entries: Vec<TrustedController>) -> Result<Self, TrustedConfigError> {
        let mut out = Self::default();
        for (i, e) in entries.iter().enumerate() {
            let named = |v: &Option<String>| v.as_deref().is_some_and(|s| !s.is_empty());
            if named(&e.username) == named(&e.group) {
                return Err(TrustedConfigError::Requester(i));
            }
            if e.user_annotation.is_empty() {
                return Err(TrustedConfigError::EmptyAnnotation(i));
            }
            out.user_annotations.insert(e.user_annotation.clone());
            if let Some(g) = e.groups_annotation.as_ref().filter(|g| !g.is_empty()) {
                out.groups_annotations.insert(g.clone());
            }
        }
        out.entries = entries;
        Ok(out)
    }

    /// The entries that trust this requester, in configuration order.
    pub(crate) fn matching<'a>(
        &'a self,
        username: &'a str,
        groups: &'a [String],
    ) -> impl Iterator<Item = &'a TrustedController> + 'a {
        self.entries.iter().filter(move |e| {
            e.username.as_deref() == Some(username)
                || e.group
                    .as_deref()
                    .is_some_and(|g| groups.iter().any(|x| x == g))
        })
    }

    /// Whether any entry trusts this requester.
    pub fn trusts(&self, username: &str, groups: &[String]) -> bool {
        self.matching(username, groups).next().is_some()
    }

    /// Annotations naming that user's groups (ignored from untrusted requesters).
    pub fn groups_annotations(&self) -> &BTreeSet<String> {
        &self.groups_annotations
    }

    /// Every on-behalf annotation, users' and groups'.
    pub fn on_behalf_annotations(&self) -> impl Iterator<Item = &String> {
        self.user_annotations.iter().chain(&self.groups_annotations)
    }
}
