//! The published contract as a reviewed file: any change to a route, a type, a pattern or a
//! status the API documents shows up here as a diff of `snapshots/openapi__contract.snap`.

#[test]
fn the_openapi_document_is_the_reviewed_contract() {
    let document = serde_json::to_value(api::http::openapi::document(false)).expect("the document serialises");
    insta::assert_json_snapshot!("contract", document);
}
