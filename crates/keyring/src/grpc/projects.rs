//! Project RPCs: CreateProject, GetProject, ListProjects, UpdateProject (name and limits) and
//! DeleteProject.

use keyshare_proto::keyring::v1 as pb;
use keyshare_runtime::error::{InvalidInput, update_paths};

use super::convert::{limits, project_pb};
use super::{finish, page};
use crate::app::{Ctx, Keyring, ProjectChange};
use crate::domain;
use crate::error::Error;

pub(super) async fn create_project(
    keyring: &Keyring,
    ctx: Ctx,
    r: pb::CreateProjectRequest,
) -> Result<pb::CreateProjectResponse, Error> {
    let mut errors = InvalidInput::default();
    let org = errors.check(domain::parse_org(&r.parent, "parent"));
    let project = r.project.unwrap_or_default();
    let name = errors.check(domain::project_name(&project.display_name, "project.display_name"));
    let sandbox = errors.check(limits(project.sandbox, "project.sandbox"));
    let production = errors.check(limits(project.production, "project.production"));
    let (org, name, sandbox, production) =
        finish(errors, org.zip(name).zip(sandbox).zip(production).map(|(((a, b), c), d)| (a, b, c, d)))?;
    let project = keyring.create_project(&ctx, org, name, sandbox, production).await?;
    Ok(pb::CreateProjectResponse { project: Some(project_pb(project)) })
}

pub(super) async fn get_project(
    keyring: &Keyring,
    ctx: Ctx,
    r: pb::GetProjectRequest,
) -> Result<pb::GetProjectResponse, Error> {
    let project = keyring.get_project(&ctx, domain::parse_project(&r.name, "name")?).await?;
    Ok(pb::GetProjectResponse { project: Some(project_pb(project)) })
}

pub(super) async fn list_projects(
    keyring: &Keyring,
    ctx: Ctx,
    r: pb::ListProjectsRequest,
) -> Result<pb::ListProjectsResponse, Error> {
    let org = domain::parse_org(&r.parent, "parent")?;
    let page = page(r.page_size, &r.page_token, &format!("organizations/{org}/projects"))?;
    let page = keyring.list_projects(&ctx, org, page).await?;
    Ok(pb::ListProjectsResponse {
        projects: page.items.into_iter().map(project_pb).collect(),
        next_page_token: page.next_page_token,
    })
}

pub(super) async fn update_project(
    keyring: &Keyring,
    ctx: Ctx,
    r: pb::UpdateProjectRequest,
) -> Result<pb::UpdateProjectResponse, Error> {
    let project = r.project.ok_or_else(|| InvalidInput::field("project", "is required"))?;
    let allowed = [
        "display_name",
        "sandbox",
        "production",
        "sandbox.rate_limit_per_second",
        "sandbox.monthly_quota",
        "production.rate_limit_per_second",
        "production.monthly_quota",
    ];
    let mut errors = InvalidInput::default();
    let id = errors.check(domain::parse_project(&project.name, "project.name"));
    let limits = |env: &str, l: &Option<pb::ProjectEnvironmentLimits>| {
        let l = l.unwrap_or_default();
        [
            (l.rate_limit_per_second != 0).then(|| format!("{env}.rate_limit_per_second")),
            (l.monthly_quota != 0).then(|| format!("{env}.monthly_quota")),
        ]
    };
    let mut populated: Vec<String> = limits("sandbox", &project.sandbox)
        .into_iter()
        .chain(limits("production", &project.production))
        .flatten()
        .collect();
    if !project.display_name.is_empty() {
        populated.push("display_name".into());
    }
    let populated: Vec<&str> = populated.iter().map(String::as_str).collect();
    let paths = errors.check(update_paths(r.update_mask, &allowed, &populated)).unwrap_or_default();
    let has = |path: &str| paths.iter().any(|p| p == path || path.starts_with(&format!("{p}.")));
    let mut change = ProjectChange::default();
    if has("display_name") {
        change.display_name = errors.check(domain::project_name(&project.display_name, "project.display_name"));
    }
    for (env, limits) in [("sandbox", project.sandbox), ("production", project.production)] {
        let limits = limits.unwrap_or_default();
        let rate_path = format!("{env}.rate_limit_per_second");
        let quota_path = format!("{env}.monthly_quota");
        let rate = has(&rate_path)
            .then(|| errors.check(domain::limit(limits.rate_limit_per_second, &format!("project.{rate_path}"))))
            .flatten();
        let quota = has(&quota_path)
            .then(|| errors.check(domain::limit(limits.monthly_quota, &format!("project.{quota_path}"))))
            .flatten();
        if env == "sandbox" {
            (change.sandbox_rate_limit, change.sandbox_monthly_quota) = (rate, quota);
        } else {
            (change.production_rate_limit, change.production_monthly_quota) = (rate, quota);
        }
    }
    let id = finish(errors, id)?;
    let project = keyring.update_project(&ctx, id, change).await?;
    Ok(pb::UpdateProjectResponse { project: Some(project_pb(project)) })
}

pub(super) async fn delete_project(
    keyring: &Keyring,
    ctx: Ctx,
    r: pb::DeleteProjectRequest,
) -> Result<pb::DeleteProjectResponse, Error> {
    keyring.delete_project(&ctx, domain::parse_project(&r.name, "name")?, r.force).await?;
    Ok(pb::DeleteProjectResponse {})
}
