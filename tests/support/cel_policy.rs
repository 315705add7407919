//! The shipped CEL (webhook matchConditions, ValidatingAdmissionPolicies) evaluated with the `cel`
//! crate and the strings extension, as the API server would: variables in order, then the
//! matchConditions, then each validation and its messageExpression. An evaluation error fails the
//! test (with failurePolicy Fail the API server would reject the request). The real API server
//! runs the same manifests in tests/kube_api.rs.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

fn env() -> Arc<cel::Env> {
    let mut env = cel::Env::stdlib();
    env.add_extension(cel::extensions::strings)
        .unwrap_or_else(|e| panic!("strings extension: {e:?}"));
    Arc::new(env)
}

fn compile(env: &cel::Env, expression: &str) -> cel::Program {
    env.compile(expression)
        .unwrap_or_else(|e| panic!("CEL does not parse: {e}\n{expression}"))
}

/// One expression against `bindings` (name -> JSON value).
pub fn eval(expression: &str, bindings: &[(&str, &Value)]) -> cel::Value {
    let env = env();
    let program = compile(&env, expression);
    let mut context = cel::Context::with_env(env);
    for (name, value) in bindings {
        context.add_variable_from_value(*name, cel::to_value(value).unwrap());
    }
    program
        .execute(&context)
        .unwrap_or_else(|e| panic!("CEL failed: {e:?}\n{expression}"))
}

/// A boolean expression.
pub fn holds(expression: &str, bindings: &[(&str, &Value)]) -> bool {
    match eval(expression, bindings) {
        cel::Value::Bool(b) => b,
        other => panic!("expected a bool, got {other:?}\n{expression}"),
    }
}

/// What a ValidatingAdmissionPolicy decides for one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A matchCondition was false: the policy does not apply.
    NotMatched,
    Allowed,
    /// The first failed validation's message.
    Denied(String),
}

/// Evaluates `policy` (a ValidatingAdmissionPolicy as JSON) for a request.
pub fn evaluate(
    policy: &Value,
    object: &Value,
    old_object: &Value,
    request: &Value,
    params: &Value,
) -> Verdict {
    let env = env();
    let spec = &policy["spec"];
    let mut context = cel::Context::with_env(env.clone());
    for (name, value) in [
        ("object", object),
        ("oldObject", old_object),
        ("request", request),
        ("params", params),
    ] {
        context.add_variable_from_value(name, cel::to_value(value).unwrap());
    }
    let mut variables: HashMap<String, cel::Value> = HashMap::new();
    let empty = Vec::new();
    for variable in spec["variables"].as_array().unwrap_or(&empty) {
        let name = variable["name"].as_str().unwrap();
        let program = compile(&env, variable["expression"].as_str().unwrap());
        let mut scope = context.new_inner_scope();
        scope.add_variable_from_value("variables", cel::Value::from(variables.clone()));
        // Variables are lazy in the API server: one that fails is an error only when used.
        if let Ok(value) = program.execute(&scope) {
            variables.insert(name.to_string(), value);
        }
    }
    context.add_variable_from_value("variables", cel::Value::from(variables));
    let run = |expression: &str| {
        compile(&env, expression)
            .execute(&context)
            .unwrap_or_else(|e| panic!("CEL failed: {e:?}\n{expression}"))
    };
    for condition in spec["matchConditions"].as_array().unwrap_or(&empty) {
        if run(condition["expression"].as_str().unwrap()) != cel::Value::Bool(true) {
            return Verdict::NotMatched;
        }
    }
    for validation in spec["validations"].as_array().unwrap() {
        if run(validation["expression"].as_str().unwrap()) == cel::Value::Bool(true) {
            continue;
        }
        let message = match validation["messageExpression"].as_str() {
            Some(expression) => match run(expression) {
                cel::Value::String(s) => s.to_string(),
                other => panic!("messageExpression gave {other:?}"),
            },
            None => validation["message"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        };
        return Verdict::Denied(message);
    }
    Verdict::Allowed
}

/// `object` with `value` set at a schema path such as `volumes[].csi.nodePublishSecretRef.name`,
/// creating objects and one-item lists along the way (the first item of an existing list).
pub fn set_path(object: &mut Value, path: &str, value: Value) {
    let mut node = object;
    let segments: Vec<&str> = path.split('.').collect();
    for (i, segment) in segments.iter().enumerate() {
        let last = i == segments.len() - 1;
        let (key, list) = match segment.strip_suffix("[]") {
            Some(key) => (key, true),
            None => (*segment, false),
        };
        if node.is_null() {
            *node = serde_json::json!({});
        }
        let map = node.as_object_mut().unwrap();
        if list {
            let items = map.entry(key).or_insert_with(|| serde_json::json!([{}]));
            if items.as_array().unwrap().is_empty() {
                items.as_array_mut().unwrap().push(serde_json::json!({}));
            }
            node = &mut items.as_array_mut().unwrap()[0];
        } else if last {
            map.insert(key.to_string(), value.clone());
            return;
        } else {
            node = map.entry(key).or_insert(Value::Null);
        }
    }
}
