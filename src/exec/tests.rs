use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;

use super::properties::load;
use super::*;

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

fn confs() -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "spark.hadoop.fs.s3a.secret.key".to_string(),
            "s3 value = x".to_string(),
        ),
        (
            "spark.sql.catalog.token".to_string(),
            "tok\\en\n".to_string(),
        ),
    ])
}

#[test]
fn driver_confs_go_through_a_private_properties_file_merged_with_the_original() {
    let dir = tempfile::tempdir().unwrap();
    let original = dir.path().join("spark.properties");
    std::fs::write(
        &original,
        "spark.app.name=pi\nspark.sql.catalog.token=plain-from-file\n",
    )
    .unwrap();
    let file = properties_path(dir.path(), "spark-kubernetes-driver");
    let argv = os(&[
        "/opt/entrypoint.sh",
        "driver",
        "--properties-file",
        original.to_str().unwrap(),
        "--conf",
        "spark.sql.catalog.token=plain-from-argv",
        "--class",
        "Pi",
        "local:///app.jar",
        "--conf",
        "spark.sql.catalog.token=an-app-arg",
    ]);
    let out = spark_submit_args(&argv, 1, &confs(), &file).unwrap();
    let out: Vec<&str> = out.iter().map(|a| a.to_str().unwrap()).collect();
    assert_eq!(
        out,
        [
            "/opt/entrypoint.sh",
            "driver",
            "--properties-file",
            file.to_str().unwrap(),
            "--class",
            "Pi",
            "local:///app.jar",
            // The application's own args are not spark-submit's: untouched.
            "--conf",
            "spark.sql.catalog.token=an-app-arg",
        ]
    );
    // Values are in the file, not in argv; the secrets win over the original's entries.
    assert!(!out.iter().any(|a| a.contains("s3 value")));
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o400);
    let dir_mode = std::fs::metadata(file.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o700);
    let read = load(&std::fs::read_to_string(&file).unwrap());
    assert_eq!(read["spark.app.name"], "pi");
    assert_eq!(read["spark.sql.catalog.token"], "tok\\en\n");
    assert_eq!(read["spark.hadoop.fs.s3a.secret.key"], "s3 value = x");
    // A restarted container writes the file again (it was read-only).
    spark_submit_args(&argv, 1, &confs(), &file).unwrap();
}

#[test]
fn a_driver_whose_args_changed_after_admission_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = properties_path(dir.path(), "c");
    let e = spark_submit_args(&os(&["/opt/entrypoint.sh", "executor"]), 1, &confs(), &file)
        .unwrap_err();
    assert!(
        e.to_string().contains("do not start with \"driver\""),
        "{e}"
    );
    assert!(!file.exists());
}

#[test]
fn jupyter_confs_go_into_pyspark_submit_args_through_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = properties_path(dir.path(), "notebook");
    let current =
        "--master k8s://https://kubernetes --conf 'spark.sql.catalog.token=old' pyspark-shell";
    let next = pyspark_submit_args(current, &confs(), &file).unwrap();
    let words = shlex::split(&next).unwrap();
    assert_eq!(
        words,
        [
            "--properties-file",
            file.to_str().unwrap(),
            "--master",
            "k8s://https://kubernetes",
            "pyspark-shell"
        ]
    );
    assert!(!next.contains("s3 value"));
    let read = load(&std::fs::read_to_string(&file).unwrap());
    assert_eq!(read["spark.hadoop.fs.s3a.secret.key"], "s3 value = x");
    let e = pyspark_submit_args("--conf 'unbalanced", &confs(), &file).unwrap_err();
    assert!(e.to_string().contains("unbalanced quotes"), "{e}");
}

#[test]
fn an_unreachable_broker_is_a_clear_error_after_bounded_retries() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "a.b.c").unwrap();
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let certs = crate::certs::ensure_dev_certs(&dir.path().join("certs")).unwrap();
    let ca = std::fs::read_to_string(certs.ca).unwrap();
    let args = ExecArgs {
        broker: format!("https://127.0.0.1:{port}"),
        ca: Some(ca),
        ca_file: None,
        container: "c".into(),
        pod_uid: None,
        token_file: token.to_string_lossy().into_owned(),
        dir: dir.path().into(),
        attempts: 2,
        command: os(&["true"]),
    };
    let started = std::time::Instant::now();
    let e = fetch(&args).unwrap_err();
    assert!(
        matches!(e, ExecError::Unreachable { attempts: 2, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("after 2 attempts"), "{e}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    // No token: a clear error before any request.
    let missing = ExecArgs {
        token_file: dir.path().join("none").to_string_lossy().into_owned(),
        ..args
    };
    let e = fetch(&missing).unwrap_err();
    assert!(e.to_string().contains("cannot read the pod's token"), "{e}");
}
