//! `oncely config check` and the CLI's error messages, running the built binary.

use std::process::Stdio;

use anyhow::Result;

fn oncely(config: &std::path::Path, args: &[&str]) -> Result<(i32, String, String)> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_oncely"))
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .env_remove("ONCELY_CONFIG")
        .env_remove("ONCELY_ENV")
        .env_remove("ONCELY_MAX_BATCH")
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn file(text: &str) -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(oncely_testkit::unique("oncely-config"));
    std::fs::create_dir_all(&dir)?;
    let p = dir.join("oncely.toml");
    std::fs::write(&p, text)?;
    Ok(p)
}

#[test]
fn config_check_prints_the_effective_settings_with_secrets_masked() -> Result<()> {
    let p = file(
        r#"default_env = "prod"
[env.prod]
bootstrap_servers = "kafka:9094"
database_url = "postgres://u:dbsecret@db/oncely"
cluster_id = "C"
protected = true
[env.prod.kafka]
"security.protocol" = "SASL_SSL"
"sasl.password" = "hunter2"
[consumer.billing]
max_batch = 200
rewind_policy = "halt"
"#,
    )?;
    let (code, out, err) = oncely(&p, &["config", "check"])?;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("security.protocol = SASL_SSL") && out.contains("sasl.password = ***"), "{out}");
    assert!(out.contains("max_batch = 200") && out.contains("rewind_policy = \"halt\""), "{out}");
    assert!(!out.contains("hunter2") && !out.contains("dbsecret"), "no secret is printed: {out}");
    let (code, out, _) = oncely(&p, &["-o", "json", "config", "check"])?;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap_or_default())?;
    assert_eq!(v["consumer"]["billing"]["max_batch"], 200);
    assert_eq!(v["env"]["prod"]["kafka_properties"]["sasl.password"], "***");
    Ok(())
}

#[test]
fn an_unknown_key_is_refused_and_named() -> Result<()> {
    let p = file("[env.a]\nbootstrap_servers = \"k:1\"\ndatabase_url = \"postgres://x/y\"\nprotect = true\n")?;
    let (code, out, err) = oncely(&p, &["config", "check"])?;
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(err.contains("protect"), "{err}");
    Ok(())
}

#[test]
fn a_bad_database_url_is_explained_once() -> Result<()> {
    let p = file("[env.a]\nbootstrap_servers = \"127.0.0.1:1\"\ndatabase_url = \"oncely\"\n")?;
    let (code, out, err) = oncely(&p, &["migrate"])?;
    assert_eq!(code, 2, "a configuration error: {out}\n{err}");
    assert_eq!(err.matches("relative URL without a base").count(), 1, "the cause once: {err}");
    assert!(err.contains("postgres://"), "it says what is expected: {err}");
    Ok(())
}
