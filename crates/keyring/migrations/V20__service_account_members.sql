-- Service accounts that are project members (made so by an organization owner), and the
-- organization each belongs to, so members and key owners are named as what they are. A
-- service account's memberships end when identity deletes it (EndOrganizationMembership).
CREATE TABLE keyring.service_accounts (
    id UUID PRIMARY KEY,
    organization_id UUID NOT NULL
);
