{# Values, when present, lie within [low, high]. #}
{% test dbt_utils_free_between(model, column_name, low, high) %}
select {{ column_name }} from {{ model }}
where {{ column_name }} is not null and not ({{ column_name }} between {{ low }} and {{ high }})
{% endtest %}
