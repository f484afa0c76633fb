//! The `dev` command's demo page: connect with a printed token and watch
//! events arrive.

use axum::response::Html;

pub async fn page() -> Html<&'static str> {
    Html(include_str!("demo.html"))
}
