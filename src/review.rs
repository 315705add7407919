//! `secrets-webhook review`: run one pod or AdmissionReview through the engine and print the answer.

/// `secrets-webhook review`.
pub fn run(_args: crate::cli::ReviewArgs) -> anyhow::Result<()> {
    anyhow::bail!("review is not implemented yet")
}
