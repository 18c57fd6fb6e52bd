//! docs/openapi.yaml against the served API. The document drives the test: every
//! operation it lists is called with its own request examples and with requests its
//! request schema refuses, by a caller over mutual TLS and one over the Unix socket; each
//! answer's status must be one the operation documents, its body must validate against
//! that status's schema, and its documented headers must be there. The request schema
//! and the server must agree on what is a valid request, both ways, and nothing the
//! document does not list (path, method, answer field) may be served.

#![allow(
    clippy::expect_used,
    reason = "a test that cannot go on should fail loudly"
)]

mod common;

use std::{collections::BTreeSet, path::Path};

use serde_json::{Map, Value, json};

use common::{
    DevAgent,
    api::{
        Answer, CLIENT_ID, PAYMENTS_H2, Via, api_agent, api_agent_with, curl, curl_method, parse,
        post, raw, read_to_close,
    },
    read,
};

/// docs/openapi.yaml, as JSON.
fn document() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.yaml");
    serde_norway::from_str(&read(&path)).expect("docs/openapi.yaml is YAML")
}

/// The object `value` stands for: itself, or what its `$ref` points at in `doc`.
fn resolve<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(pointer) => resolve(
            doc,
            doc.pointer(pointer.trim_start_matches('#'))
                .unwrap_or_else(|| panic!("{pointer} is not in the document")),
        ),
        None => value,
    }
}

/// A validator for one of the document's Schema Objects, with its `$ref`s into
/// `#/components` resolvable (OpenAPI 3.1 schemas are JSON Schema 2020-12).
fn validator(doc: &Value, schema: &Value) -> jsonschema::Validator {
    let root = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "allOf": [schema],
        "components": doc["components"],
    });
    jsonschema::options()
        .should_validate_formats(true)
        .build(&root)
        .unwrap_or_else(|e| panic!("not a valid schema ({e}): {schema}"))
}

/// Why `instance` fails `schema`; empty when it validates.
fn violations(doc: &Value, schema: &Value, instance: &Value) -> Vec<String> {
    validator(doc, schema)
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

/// One documented operation.
struct Operation<'a> {
    path: String,
    method: String,
    op: &'a Value,
}

impl Operation<'_> {
    /// `POST /api/v1/token`, for failure messages.
    fn name(&self) -> String {
        format!("{} {}", self.method.to_ascii_uppercase(), self.path)
    }
}

/// Every (path, method) the document lists.
fn operations(doc: &Value) -> Vec<Operation<'_>> {
    let paths = doc["paths"].as_object().expect("paths");
    let operations: Vec<Operation<'_>> = paths
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .expect("path item")
                .iter()
                .filter(|(method, _)| METHODS.contains(&method.as_str()))
                .map(|(method, op)| Operation {
                    path: path.clone(),
                    method: method.clone(),
                    op,
                })
        })
        .collect();
    assert!(!operations.is_empty(), "the document lists no operation");
    operations
}

/// The methods a Path Item may hold.
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// The operation's JSON request body: its schema and its named examples.
fn request<'a>(doc: &'a Value, operation: &Operation<'a>) -> (&'a Value, Vec<(String, Value)>) {
    let body = resolve(doc, &operation.op["requestBody"]);
    let media = &body["content"]["application/json"];
    let examples = media["examples"]
        .as_object()
        .unwrap_or_else(|| panic!("{} has no request examples", operation.name()))
        .iter()
        .map(|(name, example)| (name.clone(), resolve(doc, example)["value"].clone()))
        .collect();
    (&media["schema"], examples)
}

/// Checks an answer against the operation's documentation: a documented status, the
/// documented headers, a body valid against that status's schema. `sent` says what
/// was sent, for the failure message.
fn conforms(doc: &Value, operation: &Operation<'_>, answer: &Answer, sent: &str) {
    let status = answer.status.to_string();
    let context = format!("{} {sent} -> {status} {}", operation.name(), answer.body);
    let documented = operation.op["responses"]
        .get(&status)
        .unwrap_or_else(|| panic!("undocumented status: {context}"));
    conforms_to(doc, resolve(doc, documented), answer, &context);
}

/// Checks an answer against one Response Object.
fn conforms_to(doc: &Value, response: &Value, answer: &Answer, context: &str) {
    for (name, header) in response["headers"].as_object().into_iter().flatten() {
        let header = resolve(doc, header);
        match answer.header(&name.to_ascii_lowercase()) {
            Some(value) => {
                let wrong = violations(doc, &header["schema"], &json!(value));
                assert!(wrong.is_empty(), "header {name}: {wrong:?}: {context}");
            }
            None => assert!(
                header["required"] != true,
                "header {name} missing: {context}"
            ),
        }
    }
    match response["content"].as_object() {
        Some(content) => {
            let media = answer
                .header("content-type")
                .unwrap_or_else(|| panic!("no content-type: {context}"));
            let documented = content
                .get(media)
                .unwrap_or_else(|| panic!("undocumented content-type {media}: {context}"));
            let wrong = violations(doc, &documented["schema"], &answer.json());
            assert!(wrong.is_empty(), "body: {wrong:?}: {context}");
        }
        None => assert!(answer.body.is_empty(), "undocumented body: {context}"),
    }
}

/// The two callers the fixtures have: a certificate over mutual TLS (whose rule fixes
/// one client_id) and the test's uid over the Unix socket (any client_id, with pid).
const CALLERS: [(&str, Via<'static>); 2] = [("payments", PAYMENTS_H2), ("uid", Via::Unix)];

/// What the Unix socket's caller is allowed beyond scopes, client_ids and resources, so
/// that the document's example with every field can be served.
const EVERYTHING: &str = "allow_pid = true\nconsumer_orgs = [\"*\"]\n\
     authorization_types = [\"*\"]\niss_onbehalfof = [\"*\"]";

/// A request the Unix socket's caller is allowed: the base the bad requests vary.
fn good() -> Value {
    json!({"identity_provider": "maskinporten", "target": "test:scope", "client_id": CLIENT_ID})
}

#[tokio::test]
async fn every_example_is_served_as_documented() {
    let doc = document();
    let (agent, _mock) = api_agent_with("", 1000, EVERYTHING).await;
    for operation in operations(&doc) {
        let (schema, examples) = request(&doc, &operation);
        let mut sent_fields = BTreeSet::new();
        for (name, example) in &examples {
            let wrong = violations(&doc, schema, example);
            assert!(wrong.is_empty(), "example {name}: {wrong:?}");
            sent_fields.extend(example.as_object().expect("an object").keys().cloned());
            let mut served = false;
            for (who, via) in &CALLERS {
                let answer = post(&agent, via, &operation.path, example);
                conforms(&doc, &operation, &answer, &format!("{name} by {who}"));
                served |= answer.status == 200;
            }
            assert!(
                served,
                "{}: no caller got example {name} served",
                operation.name()
            );
        }
        // Every documented field is in an example, so the server accepted each.
        let documented: BTreeSet<String> = resolve(&doc, schema)["properties"]
            .as_object()
            .expect("properties")
            .keys()
            .cloned()
            .collect();
        assert_eq!(sent_fields, documented, "{}", operation.name());
    }
}

/// Requests the request schema must refuse, each as (field, value), the value put into
/// [`good`] (`None`: the field taken out). The server must refuse each with a
/// documented 4xx that names the field.
fn bad_requests() -> Vec<(&'static str, Option<Value>)> {
    [
        ("unknown_field", Some(json!("x"))),
        ("scopes", Some(json!(["test:scope"]))),
        ("identity_provider", Some(json!("idporten"))),
        ("identity_provider", None),
        ("target", None),
        ("target", Some(json!(5))),
        ("target", Some(json!(" "))),
        ("target", Some(json!("noprefix"))),
        ("target", Some(json!("test:scope test scope"))),
        ("resource", Some(json!({"x": 1}))),
        ("resource", Some(json!(""))),
        ("resource", Some(json!(["not a uri"]))),
        ("resource", Some(json!([5]))),
        ("skip_cache", Some(json!("yes"))),
        (
            "authorization_details",
            Some(json!({"type": "urn:altinn:systemuser"})),
        ),
        ("authorization_details", Some(json!([]))),
        ("authorization_details", Some(json!([{"id": 1}]))),
        ("client_id", Some(json!(""))),
        ("client_id", Some(json!("has space"))),
        ("client_id", Some(json!(5))),
        ("consumer_org", Some(json!("12345"))),
        ("pid", Some(json!("123"))),
        ("iss_onbehalfof", Some(json!("a b"))),
        ("lifetime_seconds", Some(json!(600))),
        ("lifetime_seconds", Some(json!(-1))),
        ("lifetime_seconds", Some(json!("60"))),
        ("key", Some(json!(5))),
        ("environment", Some(json!(true))),
    ]
    .into()
}

/// `good()` with `field` set to `value`, or taken out.
fn with(field: &str, value: Option<&Value>) -> Value {
    let mut request = good();
    let object: &mut Map<String, Value> = request.as_object_mut().expect("object");
    match value {
        Some(value) => {
            let _ = object.insert(field.to_owned(), value.clone());
        }
        None => {
            let _ = object.remove(field);
        }
    }
    request
}

#[tokio::test]
async fn the_request_schema_and_the_server_refuse_the_same_requests() {
    let doc = document();
    let (agent, _mock) = api_agent_with("", 1000, EVERYTHING).await;
    for operation in operations(&doc) {
        let (schema, _) = request(&doc, &operation);
        let base = post(&agent, &Via::Unix, &operation.path, &good());
        assert_eq!(base.status, 200, "{}: {}", operation.name(), base.body);
        assert!(violations(&doc, schema, &good()).is_empty());
        for (field, value) in bad_requests() {
            let body = with(field, value.as_ref());
            assert!(
                !violations(&doc, schema, &body).is_empty(),
                "the schema accepts {body}, which the server refuses"
            );
            let answer = post(&agent, &Via::Unix, &operation.path, &body);
            conforms(&doc, &operation, &answer, &body.to_string());
            assert!(
                (400..500).contains(&answer.status),
                "{body}: {}",
                answer.body
            );
            let description = answer.json()["error_description"].to_string();
            assert!(description.contains(field), "{body}: {description}");
        }
        // `null` for each documented field: where the schema takes it, the server
        // answers as if the field were left out; where not, the server refuses it too.
        let properties = resolve(&doc, schema)["properties"]
            .as_object()
            .expect("properties");
        for field in properties.keys() {
            let body = with(field, Some(&Value::Null));
            let answer = post(&agent, &Via::Unix, &operation.path, &body);
            conforms(&doc, &operation, &answer, &body.to_string());
            let expected = if violations(&doc, schema, &body).is_empty() {
                post(&agent, &Via::Unix, &operation.path, &with(field, None)).status
            } else {
                400
            };
            assert_eq!(answer.status, expected, "{body}: {}", answer.body);
        }
        // Not JSON at all.
        let broken = curl(&agent, &Via::Unix, &operation.path, "{", "application/json");
        conforms(&doc, &operation, &broken, "{");
        assert_eq!(broken.status, 400);
    }
}

/// Sends `body` to the operation with `content_type` over the Unix socket, checks the
/// answer is documented, and gives its status.
fn status_of(
    doc: &Value,
    agent: &DevAgent,
    operation: &Operation<'_>,
    body: &str,
    content_type: &str,
) -> u16 {
    let answer = curl(agent, &Via::Unix, &operation.path, body, content_type);
    conforms(doc, operation, &answer, body);
    answer.status
}

#[tokio::test]
async fn the_documented_errors_are_served_as_documented() {
    let doc = document();
    let (agent, _mock) = api_agent("[limits]\nrequest_timeout_seconds = 1\n", 1000).await;
    let good = good().to_string();
    for operation in operations(&doc) {
        let status = |body: &str, content_type: &str| {
            status_of(&doc, &agent, &operation, body, content_type)
        };
        assert_eq!(status(&good, "text/plain"), 415);
        let huge = with("target", Some(&json!("a:b ".repeat(20_000)))).to_string();
        assert_eq!(status(&huge, "application/json"), 413);
        let no_key = with("key", Some(&json!("no-such-key"))).to_string();
        assert_eq!(status(&no_key, "application/json"), 404);
        // payments' rule does not allow test:other.
        let refused = post(
            &agent,
            &PAYMENTS_H2,
            &operation.path,
            &json!({"identity_provider": "maskinporten", "target": "test:other"}),
        );
        conforms(&doc, &operation, &refused, "test:other by payments");
        assert_eq!(refused.status, 403);
        // A body that never finishes.
        let mut slow = raw(
            &agent.dir.path().join("agent.sock"),
            format!(
                "POST {} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
                 content-length: 100\r\n\r\n{{\"identity",
                operation.path
            )
            .as_bytes(),
        );
        let timed_out = parse(&read_to_close(&mut slow));
        conforms(&doc, &operation, &timed_out, "a slow body");
        assert_eq!(timed_out.status, 408);
    }
}

#[tokio::test]
async fn callers_over_their_rate_get_the_documented_429() {
    let doc = document();
    let (agent, _mock) = api_agent("", 2).await;
    for operation in operations(&doc) {
        let limited = (0..20)
            .map(|_| post(&agent, &Via::Unix, &operation.path, &good()))
            .find(|answer| answer.status != 200)
            .expect("the rate of 2 a second is reached within 20 requests");
        conforms(&doc, &operation, &limited, "the 3rd request in a second");
        assert_eq!(limited.status, 429, "{}", limited.body);
    }
}

#[tokio::test]
async fn only_what_the_document_lists_is_served() {
    let doc = document();
    let (agent, _mock) = api_agent("", 1000).await;
    let paths = doc["paths"].as_object().expect("paths");
    for operation in operations(&doc) {
        // Served: an empty request is the operation's own documented refusal.
        let empty = curl_method(
            &agent,
            &Via::Unix,
            &operation.method.to_ascii_uppercase(),
            &operation.path,
            "{}",
            "application/json",
        );
        conforms(&doc, &operation, &empty, "{}");
        assert_eq!(empty.status, 400, "{}", operation.name());
    }
    for (path, item) in paths {
        // The methods the document does not list for the path are not allowed: 405,
        // over HTTP/2 and over HTTP/1.1.
        let unlisted = ["get", "put", "delete", "patch"]
            .into_iter()
            .filter(|method| item.get(method).is_none());
        for method in unlisted {
            let method = method.to_ascii_uppercase();
            let answer = curl_method(
                &agent,
                &PAYMENTS_H2,
                &method,
                path,
                "{}",
                "application/json",
            );
            assert_eq!(answer.status, 405, "{method} {path}: {}", answer.body);
            assert_eq!(answer.header("allow"), Some("POST"), "{method} {path}");
        }
        for method in ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"] {
            if item.get(method.to_ascii_lowercase()).is_none() {
                let answer = curl_method(&agent, &Via::Unix, method, path, "", "application/json");
                assert_eq!(
                    answer.status, 405,
                    "{method} {path} over HTTP/1.1: {}",
                    answer.body
                );
            }
        }
    }
    // A path the document does not list: 404 with the document's error body.
    let nowhere = curl(
        &agent,
        &Via::Unix,
        "/api/v1/nothing",
        "{}",
        "application/json",
    );
    assert_eq!(nowhere.status, 404);
    let error = json!({"$ref": "#/components/schemas/Error"});
    let wrong = violations(&doc, &error, &nowhere.json());
    assert!(wrong.is_empty(), "{wrong:?}: {}", nowhere.body);
}

/// Every JSON body the operation documents: (which, schema, media type object).
fn bodies<'a>(doc: &'a Value, operation: &Operation<'a>) -> Vec<(String, &'a Value)> {
    let body = resolve(doc, &operation.op["requestBody"]);
    let mut media = vec![("request".to_owned(), &body["content"]["application/json"])];
    let responses = operation.op["responses"].as_object().expect("responses");
    for (status, response) in responses {
        let json = &resolve(doc, response)["content"]["application/json"];
        assert!(
            json.is_object(),
            "{} {status}: no JSON body",
            operation.name()
        );
        media.push((status.clone(), json));
    }
    media
}

#[test]
fn the_document_admits_no_field_it_does_not_describe() {
    let doc = document();
    assert_eq!(doc["openapi"], "3.1.0");
    for operation in operations(&doc) {
        for (which, media) in bodies(&doc, &operation) {
            let schema = resolve(&doc, &media["schema"]);
            let context = format!("{} {which}", operation.name());
            // What holds the served answers to the fields the document lists.
            assert_eq!(schema["additionalProperties"], false, "{context}");
            let properties = schema["properties"].as_object().expect("properties");
            for (name, property) in properties {
                assert!(
                    resolve(&doc, property)["description"].is_string(),
                    "{context}: {name} has no description"
                );
            }
            // The document's own examples are valid against its schemas.
            for (name, example) in media["examples"].as_object().into_iter().flatten() {
                let value = &resolve(&doc, example)["value"];
                let wrong = violations(&doc, &media["schema"], value);
                assert!(wrong.is_empty(), "{context} example {name}: {wrong:?}");
            }
        }
    }
}
